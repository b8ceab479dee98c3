// SPDX-License-Identifier: GPL-2.0
/* The same replacement named without its file: refused as ambiguous, candidates listed. */
#include <linux/kobject.h>
#include <linux/module.h>
#include <linux/sysfs.h>
#include "lucos.h"

static ssize_t lucos_any_type_show(struct kobject *kobj, struct kobj_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "lucos-patched\n");
}

LUCOS_REPLACE(type_show, lucos_any_type_show);
LUCOS_PATCH("reboot-type-bare", "type_show without its file: must be refused as ambiguous");
MODULE_LICENSE("GPL");
