//! `lucos-build`: turns a unified diff against the guest kernel's source into a lucos
//! patch module, as kpatch-build does for kpatch: the translation units the diff touches
//! are compiled before and after it with kbuild's own command lines (plus function and
//! data sections), compared function by function, and the changed functions are written
//! into one patch object whose references to unchanged code and data name the running
//! kernel's symbols. See README "Live patches from source diffs".

pub mod compile;
pub mod diff;
pub mod elf;
pub mod emit;
pub mod ksyms;
pub mod patchfile;
pub mod pipeline;
pub mod special;
pub mod tree;
