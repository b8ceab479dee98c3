// SPDX-License-Identifier: GPL-2.0
/*
 * Replaces cmdline_proc_show: /proc/cmdline shows how the kernel's boot-time rewriting
 * left a return site and an indirect-branch site of two vmlinux functions, and how lucos
 * left the same sites of two patch functions compiled to the same instructions:
 *
 *   __static_call_return0: call __fentry__; xor %eax,%eax; jmp __x86_return_thunk (+7)
 *   machine_halt:          call __fentry__; mov machine_ops+8(%rip),%rax;
 *                          jmp __x86_indirect_thunk_rax (+12)
 *
 * Each site is shown as "jmp:SYMBOL" or "call:SYMBOL" for a rel32 branch, else as its
 * bytes in hex; patch code built into the kernel would show the same.
 */
#include <linux/module.h>
#include <linux/seq_file.h>
#include <linux/static_call.h>
#include <asm/reboot.h>
#include "lucos.h"

extern void machine_halt(void);

static noinline long lucos_ret0(void)
{
	return 0;
}

static noinline void lucos_machine_halt(void)
{
	machine_ops.halt();
}

static void show_site(struct seq_file *m, const char *what, const void *fn, int off)
{
	const u8 *p = (const u8 *)fn + off;

	seq_printf(m, " %s=", what);
	if (p[0] == 0xe8 || p[0] == 0xe9) {
		const void *dest = p + 5 + *(const s32 *)(p + 1);

		seq_printf(m, "%s:%ps", p[0] == 0xe8 ? "call" : "jmp", dest);
	} else {
		seq_printf(m, "%5phN", p);
	}
}

static int lucos_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-thunks");
	show_site(m, "kernel-ret", __static_call_return0, 7);
	show_site(m, "patch-ret", lucos_ret0, 7);
	show_site(m, "kernel-icall", machine_halt, 12);
	show_site(m, "patch-icall", lucos_machine_halt, 12);
	seq_putc(m, '\n');
	return 0;
}

LUCOS_REPLACE(cmdline_proc_show, lucos_cmdline_proc_show);
LUCOS_PATCH("thunks", "/proc/cmdline shows return and indirect-branch sites of vmlinux and patch code");
MODULE_LICENSE("GPL");
