// SPDX-License-Identifier: GPL-2.0
/*
 * A real Linux 6.1 stable fix, shipped as a live patch: "prctl: fix PR_SET_MM_AUXV losing
 * the forced AT_NULL terminator". The guest image is built with the fix reverted
 * (images/kernel-patches/0001-revert-prctl-fix-PR_SET_MM_AUXV-AT_NULL.patch):
 * prctl(PR_SET_MM, PR_SET_MM_AUXV, vec, len) copied only `len` bytes into
 * mm->saved_auxv, so a short vector was followed by the stale rest of the old one and the
 * AT_NULL the kernel forces at the end was lost. This is the fixed prctl_set_auxv(),
 * identical to upstream after the fix: the whole (zero-filled, terminated) vector is
 * copied.
 */
#include <linux/module.h>
#include <linux/auxvec.h>
#include <linux/mm_types.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/uaccess.h>
#include "lucos.h"

static int lucos_prctl_set_auxv(struct mm_struct *mm, unsigned long addr, unsigned long len)
{
	unsigned long user_auxv[AT_VECTOR_SIZE] = {};

	if (len > sizeof(user_auxv))
		return -EINVAL;

	if (copy_from_user(user_auxv, (const void __user *)addr, len))
		return -EFAULT;

	/* Make sure the last entry is always AT_NULL */
	user_auxv[AT_VECTOR_SIZE - 2] = 0;
	user_auxv[AT_VECTOR_SIZE - 1] = 0;

	BUILD_BUG_ON(sizeof(user_auxv) != sizeof(mm->saved_auxv));

	task_lock(current);
	memcpy(mm->saved_auxv, user_auxv, sizeof(user_auxv));
	task_unlock(current);

	return 0;
}

LUCOS_REPLACE(prctl_set_auxv, lucos_prctl_set_auxv);
LUCOS_PATCH("stable-prctl-auxv",
	    "6.1 stable fix: prctl: fix PR_SET_MM_AUXV losing the forced AT_NULL terminator");
MODULE_LICENSE("GPL");
