// SPDX-License-Identifier: GPL-2.0
/*
 * Replaces the static type_show of kernel/reboot.c (/sys/kernel/reboot/type), one of
 * several static functions named type_show in the kernel (serial_core.c has the one
 * behind /sys/class/tty/ttyS0/type): named with its file, it is unambiguous.
 */
#include <linux/kobject.h>
#include <linux/module.h>
#include <linux/sysfs.h>
#include "lucos.h"

static ssize_t lucos_reboot_type_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "lucos-patched\n");
}

LUCOS_REPLACE_IN("reboot.c", type_show, lucos_reboot_type_show);
LUCOS_PATCH("reboot-type", "/sys/kernel/reboot/type reads 'lucos-patched' (reboot.c's type_show)");
MODULE_LICENSE("GPL");
