// SPDX-License-Identifier: GPL-2.0
/*
 * A patch whose apply callback never returns. The update server stops it at its time
 * limit, restores the vCPU, aborts the update and rolls the patch back. Used by the tests.
 */
#include <linux/module.h>
#include <linux/seq_file.h>
#include <asm/processor.h>
#include "lucos.h"

static int cmdline_show_never(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-cb-hang: this must never be seen\n");
	return 0;
}

static int hanging_callback(void)
{
	for (;;)
		cpu_relax();
	return 0;
}

LUCOS_REPLACE(cmdline_proc_show, cmdline_show_never);
LUCOS_APPLY_CALLBACK(hanging_callback);
LUCOS_PATCH("cb-hang", "apply callback never returns (test)");
MODULE_LICENSE("GPL");
