// SPDX-License-Identifier: GPL-2.0
/*
 * Replaces the uname(2) syscall entry: sysname becomes "LUCOS" and release gains a
 * "+lucos" suffix, both in the same call, so a caller can tell an old result from a new
 * one and can never see half of each.
 */
#include <linux/module.h>
#include <linux/rwsem.h>
#include <linux/sched.h>
#include <linux/string.h>
#include <linux/syscalls.h>
#include <linux/uaccess.h>
#include <linux/utsname.h>
#include "lucos.h"

extern struct rw_semaphore uts_sem;

static long lucos_sys_newuname(const struct pt_regs *regs)
{
	struct new_utsname __user *name = (struct new_utsname __user *)regs->di;
	struct new_utsname tmp;

	down_read(&uts_sem);
	memcpy(&tmp, utsname(), sizeof(tmp));
	up_read(&uts_sem);
	strscpy(tmp.sysname, "LUCOS", sizeof(tmp.sysname));
	strlcat(tmp.release, "+lucos", sizeof(tmp.release));
	if (copy_to_user(name, &tmp, sizeof(tmp)))
		return -EFAULT;
	return 0;
}

LUCOS_REPLACE(__x64_sys_newuname, lucos_sys_newuname);
LUCOS_PATCH("uname", "uname(2) reports sysname LUCOS and release <release>+lucos");
MODULE_LICENSE("GPL");
