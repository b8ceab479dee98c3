//! Red-black tree insertion and removal on the Linux kernel's `struct rb_node` layout
//! (`__rb_parent_color`, `rb_right`, `rb_left`: three words, the colour in bit 0 of the
//! first, red = 0, black = 1), over any word-addressed memory: the VMM uses it on guest
//! memory, with every vCPU paused, to add patch code to the kernel's module address tree.
//!
//! The algorithms are the textbook ones (insertion and deletion with recolouring and
//! rotations); the kernel only needs the result to be a valid red-black tree with correct
//! parent links, which the unit tests check after every operation.

/// Word access to the memory holding the nodes.
pub trait Words {
    /// The error of a failed access.
    type Error;
    /// Reads the word at `addr`.
    fn read(&self, addr: u64) -> Result<u64, Self::Error>;
    /// Writes the word at `addr`.
    fn write(&self, addr: u64, v: u64) -> Result<(), Self::Error>;
}

const BLACK: u64 = 1;
const RED: u64 = 0;

/// A child of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Left,
    Right,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        }
    }
    /// Offset of the child pointer in `struct rb_node`.
    fn offset(self) -> u64 {
        match self {
            Side::Left => 16,
            Side::Right => 8,
        }
    }
}

/// A tree: its `struct rb_root` (one word: the root node's address, 0 when empty) at
/// `root`, and nodes at their `struct rb_node` addresses.
pub struct RbTree<'a, W: Words> {
    mem: &'a W,
    root: u64,
}

impl<'a, W: Words> RbTree<'a, W> {
    /// The tree whose `struct rb_root` is at `root`.
    pub fn new(mem: &'a W, root: u64) -> Self {
        Self { mem, root }
    }

    fn pc(&self, n: u64) -> Result<u64, W::Error> {
        self.mem.read(n)
    }
    fn parent(&self, n: u64) -> Result<u64, W::Error> {
        Ok(self.pc(n)? & !3)
    }
    fn is_black(&self, n: u64) -> Result<bool, W::Error> {
        // Absent (0) nodes are black.
        Ok(n == 0 || self.pc(n)? & 1 == BLACK)
    }
    fn left(&self, n: u64) -> Result<u64, W::Error> {
        self.child(n, Side::Left)
    }
    fn right(&self, n: u64) -> Result<u64, W::Error> {
        self.child(n, Side::Right)
    }
    fn set_left(&self, n: u64, v: u64) -> Result<(), W::Error> {
        self.set_child(n, Side::Left, v)
    }
    fn set_right(&self, n: u64, v: u64) -> Result<(), W::Error> {
        self.set_child(n, Side::Right, v)
    }
    fn set_parent(&self, n: u64, p: u64) -> Result<(), W::Error> {
        let c = self.pc(n)? & 1;
        self.mem.write(n, p | c)
    }
    fn set_color(&self, n: u64, c: u64) -> Result<(), W::Error> {
        let p = self.parent(n)?;
        self.mem.write(n, p | c)
    }
    /// The root node (0: empty tree).
    pub fn root(&self) -> Result<u64, W::Error> {
        self.mem.read(self.root)
    }
    fn set_root(&self, n: u64) -> Result<(), W::Error> {
        self.mem.write(self.root, n)
    }

    /// Makes `new` take `old`'s place under `old`'s parent `p`.
    fn replace_child(&self, p: u64, old: u64, new: u64) -> Result<(), W::Error> {
        if p == 0 {
            self.set_root(new)
        } else if self.left(p)? == old {
            self.set_left(p, new)
        } else {
            self.set_right(p, new)
        }
    }

    fn child(&self, n: u64, side: Side) -> Result<u64, W::Error> {
        self.mem.read(n + side.offset())
    }
    fn set_child(&self, n: u64, side: Side, v: u64) -> Result<(), W::Error> {
        self.mem.write(n + side.offset(), v)
    }

    /// Rotates `x` towards `side`: its child on the other side takes its place.
    fn rotate(&self, x: u64, side: Side) -> Result<(), W::Error> {
        let y = self.child(x, side.other())?;
        let inner = self.child(y, side)?;
        self.set_child(x, side.other(), inner)?;
        if inner != 0 {
            self.set_parent(inner, x)?;
        }
        let p = self.parent(x)?;
        self.set_parent(y, p)?;
        self.replace_child(p, x, y)?;
        self.set_child(y, side, x)?;
        self.set_parent(x, y)
    }

    /// Inserts node `z` (its three words are overwritten), ordered by `less(a, b)`: a node
    /// goes left of every node it is less than, right otherwise (as the kernel's
    /// `latch_tree_insert` does).
    pub fn insert(&self, z: u64, less: impl Fn(u64, u64) -> Result<bool, W::Error>) -> Result<(), W::Error> {
        let mut y = 0;
        let mut x = self.root()?;
        let mut go_left = false;
        while x != 0 {
            y = x;
            go_left = less(z, x)?;
            x = if go_left { self.left(x)? } else { self.right(x)? };
        }
        self.mem.write(z, y | RED)?;
        self.set_left(z, 0)?;
        self.set_right(z, 0)?;
        if y == 0 {
            self.set_root(z)?;
        } else if go_left {
            self.set_left(y, z)?;
        } else {
            self.set_right(y, z)?;
        }
        self.insert_fixup(z)
    }

    fn insert_fixup(&self, mut z: u64) -> Result<(), W::Error> {
        loop {
            let p = self.parent(z)?;
            if p == 0 || self.is_black(p)? {
                break;
            }
            let g = self.parent(p)?; // a red node is never the root: g exists
            let side = if p == self.left(g)? { Side::Left } else { Side::Right };
            let u = self.child(g, side.other())?;
            if !self.is_black(u)? {
                self.set_color(p, BLACK)?;
                self.set_color(u, BLACK)?;
                self.set_color(g, RED)?;
                z = g;
                continue;
            }
            if z == self.child(p, side.other())? {
                z = p;
                self.rotate(z, side)?;
            }
            let p = self.parent(z)?;
            let g = self.parent(p)?;
            self.set_color(p, BLACK)?;
            self.set_color(g, RED)?;
            self.rotate(g, side.other())?;
        }
        let r = self.root()?;
        self.set_color(r, BLACK)
    }

    /// Whether node `z` is in the tree (walks from the root with `less`, then checks the
    /// path's nodes for `z` itself among equal keys).
    pub fn contains(&self, z: u64) -> Result<bool, W::Error> {
        // Walk up from z: it is in this tree if its ancestors lead to the root.
        let mut n = z;
        for _ in 0..128 {
            let p = self.parent(n)?;
            if p == 0 {
                return Ok(self.root()? == n);
            }
            if self.left(p)? != n && self.right(p)? != n {
                return Ok(false);
            }
            n = p;
        }
        Ok(false)
    }

    /// Removes node `z`, which must be in the tree.
    pub fn erase(&self, z: u64) -> Result<(), W::Error> {
        let (zl, zr) = (self.left(z)?, self.right(z)?);
        let (x, xp, removed_black);
        if zl == 0 || zr == 0 {
            // z has at most one child: splice it out.
            x = if zl != 0 { zl } else { zr };
            xp = self.parent(z)?;
            removed_black = self.is_black(z)?;
            if x != 0 {
                self.set_parent(x, xp)?;
            }
            self.replace_child(xp, z, x)?;
        } else {
            // y: z's successor (leftmost of the right subtree) takes z's place and colour.
            let mut y = zr;
            while self.left(y)? != 0 {
                y = self.left(y)?;
            }
            removed_black = self.is_black(y)?;
            x = self.right(y)?;
            if self.parent(y)? == z {
                xp = y;
            } else {
                xp = self.parent(y)?;
                if x != 0 {
                    self.set_parent(x, xp)?;
                }
                self.set_left(xp, x)?;
                self.set_right(y, zr)?;
                self.set_parent(zr, y)?;
            }
            let zp = self.parent(z)?;
            self.replace_child(zp, z, y)?;
            self.set_left(y, zl)?;
            self.set_parent(zl, y)?;
            let zc = self.pc(z)? & 1;
            self.mem.write(y, zp | zc)?;
        }
        if removed_black {
            self.erase_fixup(x, xp)?;
        }
        Ok(())
    }

    fn erase_fixup(&self, mut x: u64, mut xp: u64) -> Result<(), W::Error> {
        while x != self.root()? && self.is_black(x)? {
            // x (possibly absent) is on `side` of xp; its sibling subtree is never empty.
            let side = if x == self.left(xp)? { Side::Left } else { Side::Right };
            let mut w = self.child(xp, side.other())?;
            if !self.is_black(w)? {
                self.set_color(w, BLACK)?;
                self.set_color(xp, RED)?;
                self.rotate(xp, side)?;
                w = self.child(xp, side.other())?;
            }
            if self.is_black(self.left(w)?)? && self.is_black(self.right(w)?)? {
                self.set_color(w, RED)?;
                x = xp;
                xp = self.parent(x)?;
                continue;
            }
            if self.is_black(self.child(w, side.other())?)? {
                let near = self.child(w, side)?;
                self.set_color(near, BLACK)?;
                self.set_color(w, RED)?;
                self.rotate(w, side.other())?;
                w = self.child(xp, side.other())?;
            }
            let c = self.pc(xp)? & 1;
            self.set_color(w, c)?;
            self.set_color(xp, BLACK)?;
            let far = self.child(w, side.other())?;
            if far != 0 {
                self.set_color(far, BLACK)?;
            }
            self.rotate(xp, side)?;
            x = self.root()?;
            break;
        }
        if x != 0 {
            self.set_color(x, BLACK)?;
        }
        Ok(())
    }
}

/// Word memory for unit tests of code that edits guest structures through [`Words`].
#[cfg(test)]
pub(crate) mod testing {
    use super::Words;
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// Sparse memory: a word never written reads as 0.
    #[derive(Default)]
    pub(crate) struct Mem(RefCell<HashMap<u64, u64>>);
    impl Words for Mem {
        type Error = ();
        fn read(&self, a: u64) -> Result<u64, ()> {
            Ok(*self.0.borrow().get(&a).unwrap_or(&0))
        }
        fn write(&self, a: u64, v: u64) -> Result<(), ()> {
            self.0.borrow_mut().insert(a, v);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Mem;
    use super::*;

    const ROOT: u64 = 0x100;
    /// Node i lives at 0x1000 * (i + 1); its key is in the word after the node.
    fn node(i: u64) -> u64 {
        0x1000 * (i + 1)
    }

    /// Checks every red-black property and the parent links; returns the keys in order.
    fn check(m: &Mem) -> Vec<u64> {
        let t = RbTree::new(m, ROOT);
        fn walk(t: &RbTree<Mem>, m: &Mem, n: u64, parent: u64, out: &mut Vec<u64>) -> u64 {
            if n == 0 {
                return 1;
            }
            assert_eq!(t.parent(n).unwrap(), parent, "parent link of {n:#x}");
            let (l, r) = (t.left(n).unwrap(), t.right(n).unwrap());
            if !t.is_black(n).unwrap() {
                assert!(
                    t.is_black(l).unwrap() && t.is_black(r).unwrap(),
                    "red {n:#x} has a red child"
                );
            }
            let bl = walk(t, m, l, n, out);
            out.push(m.read(n + 24).unwrap());
            let br = walk(t, m, r, n, out);
            assert_eq!(bl, br, "black heights under {n:#x}");
            bl + u64::from(t.is_black(n).unwrap())
        }
        let mut keys = Vec::new();
        let root = t.root().unwrap();
        assert!(t.is_black(root).unwrap(), "root is black");
        walk(&t, m, root, 0, &mut keys);
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted, "in-order walk is sorted");
        keys
    }

    #[test]
    fn inserts_and_erases_keep_a_valid_tree() {
        let m = Mem::default();
        let t = RbTree::new(&m, ROOT);
        let less = |a: u64, b: u64| Ok(m.read(a + 24)? < m.read(b + 24)?);
        // A deterministic shuffle of 0..200 (keys), inserted, then erased in another order.
        let keys: Vec<u64> = (0..200u64).map(|i| (i * 73 + 11) % 200).collect();
        let mut present = Vec::new();
        for &k in &keys {
            m.write(node(k) + 24, k).unwrap();
            t.insert(node(k), less).unwrap();
            present.push(k);
            present.sort_unstable();
            assert_eq!(check(&m), present);
        }
        assert!(t.contains(node(5)).unwrap());
        for i in 0..200u64 {
            let k = (i * 37 + 5) % 200;
            t.erase(node(k)).unwrap();
            assert!(!t.contains(node(k)).unwrap());
            present.retain(|&p| p != k);
            if present.is_empty() {
                assert_eq!(t.root().unwrap(), 0);
            } else {
                assert_eq!(check(&m), present);
            }
        }
    }
}
