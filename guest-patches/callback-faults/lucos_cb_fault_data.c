// SPDX-License-Identifier: GPL-2.0
/*
 * A data patch (the demo-units rule on /proc/lucos_demo_timeout) whose apply callback
 * faults. By the time the callback runs, the tunable has been converted and its page
 * write-protected; the abort must convert it back and leave no page read-only. Used by the
 * tests.
 */
#include <linux/module.h>
#include <linux/seq_file.h>
#include "lucos.h"

extern unsigned long lucos_demo_timeout;

static int lucos_demo_show_never(struct seq_file *m, void *v)
{
	seq_printf(m, "%lu (lucos-cb-fault-data: this must never be seen)\n",
		   READ_ONCE(lucos_demo_timeout));
	return 0;
}

static int faulting_callback(void)
{
	return *(volatile int *)0x10;
}

LUCOS_REPLACE(lucos_demo_show, lucos_demo_show_never);
LUCOS_DATA_SCALE(lucos_demo_timeout, 1000, 1);
LUCOS_APPLY_CALLBACK(faulting_callback);
LUCOS_PATCH("cb-fault-data", "data patch whose apply callback faults (test)");
MODULE_LICENSE("GPL");
