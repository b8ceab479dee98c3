// SPDX-License-Identifier: GPL-2.0
/*
 * A data patch that names a global the kernel does not have: the update server must refuse it before touching the guest.
 * Used by the tests.
 */
#include <linux/module.h>
#include <linux/seq_file.h>
#include "lucos.h"

static int cmdline_show_never(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-bad-data: this must never be seen\n");
	return 0;
}

LUCOS_REPLACE(cmdline_proc_show, cmdline_show_never);
LUCOS_DATA_SCALE(lucos_no_such_global, 1000, 1);
LUCOS_PATCH("bad-data-missing", "data rule that must be refused (test)");
MODULE_LICENSE("GPL");
