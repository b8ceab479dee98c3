// SPDX-License-Identifier: GPL-2.0
/*
 * Replaces version_proc_show: /proc/version reports what the patch code's static branches
 * on the kernel's `signal_generate` tracepoint key say, as code built into the kernel
 * would. Userspace flips the key by enabling the event in tracefs
 * (events/signal/signal_generate/enable).
 *
 * Three sites of one key: `short` and `long` are `static_key_false()` (what
 * trace_signal_generate_enabled() is: a NOP that becomes a jmp, branch 0; `long` is
 * pushed into a 5-byte site by the code between it and its target), `likely` is the
 * expansion of static_branch_likely() on a default-false key (a jmp that becomes a NOP,
 * branch 1).
 */
#include <linux/jump_label.h>
#include <linux/module.h>
#include <linux/seq_file.h>
#include <linux/tracepoint.h>
#include "lucos.h"

extern struct tracepoint __tracepoint_signal_generate;

static noinline bool lucos_key_short(void)
{
	return static_key_false(&__tracepoint_signal_generate.key);
}

static noinline bool lucos_key_long(void)
{
	if (static_key_false(&__tracepoint_signal_generate.key))
		return true;
	/* 300 bytes of NOPs between the site and its "yes" target: a 5-byte site. */
	asm volatile(".skip 300, 0x90");
	return false;
}

static noinline bool lucos_key_likely(void)
{
	return !arch_static_branch_jump(&__tracepoint_signal_generate.key, true);
}

static int lucos_version_proc_show(struct seq_file *m, void *v)
{
	seq_printf(m, "lucos-statickey short=%d long=%d likely=%d\n", lucos_key_short(),
		   lucos_key_long(), lucos_key_likely());
	return 0;
}

LUCOS_REPLACE(version_proc_show, lucos_version_proc_show);
LUCOS_PATCH("statickey", "/proc/version reports static branches on the signal_generate tracepoint key");
MODULE_LICENSE("GPL");
