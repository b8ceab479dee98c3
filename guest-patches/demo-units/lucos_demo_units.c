// SPDX-License-Identifier: GPL-2.0
/*
 * A data patch: /proc/lucos_demo_timeout (images/kernel-patches/0002-...) keeps its tunable
 * in milliseconds; after this patch the kernel keeps it in microseconds. Writes still take
 * milliseconds (the user interface is unchanged), reads now print microseconds.
 *
 * LUCOS_DATA_SCALE tells the update server to carry the state over: the current value is
 * multiplied by 1000 when the jumps go in, and until the patch commits every write to the
 * tunable made by old code (e.g. a task that was asleep inside the old write handler) is
 * converted too. Rollback divides by 1000 and converts writes from this module's code.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/seq_file.h>
#include <linux/uaccess.h>
#include <linux/delay.h>
#include "lucos.h"

extern unsigned long lucos_demo_timeout;

static int lucos_demo_show_us(struct seq_file *m, void *v)
{
	seq_printf(m, "%lu us\n", READ_ONCE(lucos_demo_timeout));
	return 0;
}

static ssize_t lucos_demo_write_us(struct file *file, const char __user *ubuf,
				   size_t len, loff_t *ppos)
{
	char buf[64];
	unsigned long val, delay = 0;

	if (len >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, len))
		return -EFAULT;
	buf[len] = 0;
	if (sscanf(buf, "%lu %lu", &val, &delay) < 1)
		return -EINVAL;
	if (delay)
		msleep(delay);
	WRITE_ONCE(lucos_demo_timeout, val * 1000);
	return len;
}

LUCOS_REPLACE(lucos_demo_show, lucos_demo_show_us);
LUCOS_REPLACE(lucos_demo_write, lucos_demo_write_us);
LUCOS_DATA_SCALE(lucos_demo_timeout, 1000, 1);
LUCOS_PATCH("demo-units", "lucos_demo_timeout in microseconds (was milliseconds)");
MODULE_LICENSE("GPL");
