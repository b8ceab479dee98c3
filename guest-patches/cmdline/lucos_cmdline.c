// SPDX-License-Identifier: GPL-2.0
/* Replaces cmdline_proc_show: /proc/cmdline gains a "lucos-patched" prefix. */
#include <linux/init.h>
#include <linux/seq_file.h>
#include <linux/module.h>
#include "lucos.h"

static int lucos_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, "lucos-patched ");
	seq_puts(m, saved_command_line);
	seq_putc(m, '\n');
	return 0;
}

LUCOS_REPLACE(cmdline_proc_show, lucos_cmdline_proc_show);
LUCOS_PATCH("cmdline", "prefix /proc/cmdline with 'lucos-patched'");
MODULE_LICENSE("GPL");
