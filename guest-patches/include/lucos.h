/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lucos patch module declarations.
 *
 * A lucos patch is a kernel module object built with the guest kernel's own kbuild, but
 * it is never insmod'ed: the lucos update server (outside the guest) reads the .ko,
 * links it against the running kernel's symbols (exported or not), copies it into guest
 * memory the VMM reserved, and redirects the old functions with a jmp at their entry.
 *
 * The records below go into .lucos.* sections the server reads. Names are stored inline
 * (no relocations needed to read them).
 */
#ifndef _LUCOS_H
#define _LUCOS_H

#include <linux/compiler.h>
#include <linux/types.h>
#include <linux/context_tracking_irq.h>
#include <linux/pid.h>
#include <linux/pid_namespace.h>
#include <linux/preempt.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>

#define LUCOS_NAME_MAX 128
#define LUCOS_ABI_VERSION 2

struct lucos_replace {
	char old_name[LUCOS_NAME_MAX];	/* kernel function to replace */
	char new_name[LUCOS_NAME_MAX];	/* function in this module that replaces it */
	void *new_func;			/* keeps new_func alive; unused by the server */
};

struct lucos_info {
	u32 abi_version;
	char name[LUCOS_NAME_MAX];
	char description[256];
};

struct lucos_data {
	char name[LUCOS_NAME_MAX];	/* kernel global whose meaning changes */
	u64 mul;			/* new value = old value * mul / div */
	u64 div;
};

/* Replace kernel function `old` (by symbol name) with `new` from this module. */
#define LUCOS_REPLACE(old, new)							\
	static const struct lucos_replace __lucos_replace_##new			\
	__used __section(".lucos.replace") __aligned(8) = {			\
		.old_name = #old,						\
		.new_name = #new,						\
		.new_func = (void *)(new),					\
	}

/*
 * The same, for a function whose name several kernel symbols share (a static function of
 * the same name in other files, or an inline function emitted out of line in many):
 * `file` is the base name of its source file as the vmlinux's symbol table records it
 * (e.g. "reboot.c"). A plain LUCOS_REPLACE of a shared name is refused, and the refusal
 * lists every candidate as FILE:NAME,POS.
 */
#define LUCOS_REPLACE_IN(file, old, new)					\
	static const struct lucos_replace __lucos_replace_##new			\
	__used __section(".lucos.replace") __aligned(8) = {			\
		.old_name = file ":" #old,					\
		.new_name = #new,						\
		.new_func = (void *)(new),					\
	}

/*
 * ...and when `file` has several symbols of that name too (or files of the same base name
 * do): the `pos`-th of them, counting from 1 in address order (the order of
 * /proc/kallsyms). Pass "" as `file` to count among all the kernel's symbols of the name,
 * as livepatch's sympos does.
 */
#define LUCOS_REPLACE_AT(file, old, pos, new)					\
	static const struct lucos_replace __lucos_replace_##new			\
	__used __section(".lucos.replace") __aligned(8) = {			\
		.old_name = file ":" #old "," #pos,				\
		.new_name = #new,						\
		.new_func = (void *)(new),					\
	}

/*
 * Data patch: the patched code keeps the integer kernel global `sym` (4 or 8 bytes) in new
 * units, new = old * mul / div. The update server (outside the guest) carries the state
 * over: when the jumps are installed it converts the current value and write-protects the
 * global's page; until the patch commits, every write to it from code outside this
 * module (old code still running) is converted the same way, writes from this module's
 * code are stored as they are. At commit the protection is dropped. Rollback converts
 * back (value * div / mul) and treats writes from this module's code, still running, the
 * same way until the rollback finishes.
 */
#define LUCOS_DATA_SCALE(sym, m, d)						\
	static const struct lucos_data __lucos_data_##sym			\
	__used __section(".lucos.data") __aligned(8) = {			\
		.name = #sym,							\
		.mul = (m),							\
		.div = (d),							\
	}

struct lucos_callback {
	u32 kind;			/* LUCOS_CB_* */
	u32 timeout_ms;			/* 0: the server's default (1 s) */
	char name[LUCOS_NAME_MAX];	/* the patch author's function, for messages */
	char entry[LUCOS_NAME_MAX];	/* the wrapper the server calls */
	char object[LUCOS_NAME_MAX];	/* its object: a module's name, "" for vmlinux */
	void *keep;			/* keeps the wrapper alive; unused by the server */
};

#define LUCOS_CB_APPLY		1
#define LUCOS_CB_REVERT		2
#define LUCOS_CB_THREAD		3
#define LUCOS_CB_PRE_APPLY	4
#define LUCOS_CB_PRE_REVERT	5

/*
 * Callbacks are guest code that the update server runs from outside the guest: it picks a
 * vCPU at a safe point (running user code, or idle with interrupts on: it holds no kernel
 * lock), saves its state, and runs the callback there on a private stack with interrupts
 * off and a private IDT; then it restores the vCPU. So a callback runs like a hard
 * interrupt handler: it must not sleep or take a lock that might be held by the code it
 * interrupted (it never interrupts kernel code, but use the irqsave lock variants all
 * the same); it may take spinlocks, wake tasks, up() semaphores, and call any kernel
 * function (exported or not) that is safe in interrupt context. The wrapper below tells
 * RCU and the preempt count that it runs in an interrupt.
 *
 * A callback returns 0 on success. A non-zero return, an exception (e.g. a bad pointer:
 * the server sees the fault, the guest kernel never does) or running longer than its
 * time limit aborts the update: the patch is rolled back (for apply and thread
 * callbacks) and the error is reported to the user.
 */
static __always_inline void lucos_cb_enter(void)
{
	ct_irq_enter();
	preempt_count_add(HARDIRQ_OFFSET);
}

static __always_inline void lucos_cb_exit(void)
{
	preempt_count_sub(HARDIRQ_OFFSET);
	ct_irq_exit();
}

/*
 * A callback record of kind `k` for the author's function `fn`, belonging to object `obj`
 * (a module name, or "" for vmlinux: the server passes that module's struct module as a0,
 * and refuses the patch while it is not loaded), called through `wrapper(a0, a1)`, which
 * evaluates `call`; `ms` is its time limit (0: the default).
 */
#define __LUCOS_CALLBACK_AS(k, obj, fn, wrapper, ms, call)			\
	static noinline unsigned long wrapper(unsigned long a0,		\
					      unsigned long a1)		\
	{									\
		unsigned long r;						\
		lucos_cb_enter();						\
		r = (unsigned long)(long)(call);				\
		lucos_cb_exit();						\
		return r;							\
	}									\
	static const struct lucos_callback __lucos_cbrec_##wrapper		\
	__used __section(".lucos.callback") __aligned(8) = {			\
		.kind = (k),							\
		.timeout_ms = (ms),						\
		.name = #fn,							\
		.entry = #wrapper,						\
		.object = obj,							\
		.keep = (void *)wrapper,					\
	}

#define __LUCOS_CALLBACK(k, fn, ms, call)					\
	__LUCOS_CALLBACK_AS(k, "", fn, __lucos_cb_##fn, ms, call)

/*
 * int fn(void): run once before the jumps are installed, with the patch code in place but
 * unreachable; a non-zero return refuses the patch (nothing is changed in the guest).
 */
#define LUCOS_PRE_APPLY_CALLBACK(fn) __LUCOS_CALLBACK(LUCOS_CB_PRE_APPLY, fn, 0, fn())
/* int fn(void): run once before a rollback restores the original code (result logged). */
#define LUCOS_PRE_REVERT_CALLBACK(fn) __LUCOS_CALLBACK(LUCOS_CB_PRE_REVERT, fn, 0, fn())
/* int fn(void): run once, right after the jumps are installed (patch applied). */
#define LUCOS_APPLY_CALLBACK(fn) __LUCOS_CALLBACK(LUCOS_CB_APPLY, fn, 0, fn())
/* int fn(void): run once, right after the original code is restored (rollback). */
#define LUCOS_REVERT_CALLBACK(fn) __LUCOS_CALLBACK(LUCOS_CB_REVERT, fn, 0, fn())
/*
 * int fn(struct task_struct *t): run once for each guest task that was in an old function
 * when the jumps were installed, when stack inspection sees it has left the old code (at
 * the latest at commit). The server passes the task_struct and pid it saw; the task is
 * looked up again under RCU, and a task that has exited meanwhile is skipped.
 */
#define __LUCOS_THREAD_CALL(fn, a0, a1) ({					\
	struct task_struct *__t;						\
	long __r = 0;								\
	rcu_read_lock();							\
	__t = pid_task(find_pid_ns((pid_t)(a1), &init_pid_ns), PIDTYPE_PID);	\
	if (__t && __t == (struct task_struct *)(a0))				\
		__r = fn(__t);							\
	rcu_read_unlock();							\
	__r;									\
})
#define LUCOS_THREAD_CALLBACK(fn)						\
	__LUCOS_CALLBACK(LUCOS_CB_THREAD, fn, 0, __LUCOS_THREAD_CALL(fn, a0, a1))

/* Name and describe the patch (once per module). */
#define LUCOS_PATCH(pname, pdesc)						\
	static const struct lucos_info __lucos_info				\
	__used __section(".lucos.info") __aligned(8) = {			\
		.abi_version = LUCOS_ABI_VERSION,				\
		.name = pname,							\
		.description = pdesc,						\
	}

#endif /* _LUCOS_H */
