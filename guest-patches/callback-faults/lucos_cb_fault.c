// SPDX-License-Identifier: GPL-2.0
/*
 * A patch whose apply callback dereferences a bad pointer. The update server sees the
 * page fault (the guest kernel never does), aborts the update and rolls the patch back:
 * /proc/cmdline keeps printing the original command line. Used by the tests.
 */
#include <linux/module.h>
#include <linux/seq_file.h>
#include "lucos.h"

static int cmdline_show_never(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-cb-fault: this must never be seen\n");
	return 0;
}

static int faulting_callback(void)
{
	return *(volatile int *)0x10;	/* NULL-ish pointer: #PF */
}

LUCOS_REPLACE(cmdline_proc_show, cmdline_show_never);
LUCOS_APPLY_CALLBACK(faulting_callback);
LUCOS_PATCH("cb-fault", "apply callback dereferences a bad pointer (test)");
MODULE_LICENSE("GPL");
