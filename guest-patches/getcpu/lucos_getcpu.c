// SPDX-License-Identifier: GPL-2.0
/*
 * Replaces getcpu(2) with code that needs the kernel's own bookkeeping for patch code:
 * - the inline user-memory accessors unsafe_put_user/unsafe_get_user inside
 *   user_access_begin/end (exception table entries; __put_user is out of line on x86):
 *   every pointer is written, NULL too (the original skips NULL), so a NULL or unmapped
 *   pointer faults inside this code and must come back as -EFAULT, not an oops;
 * - WARN_ONCE (a BUG table entry) when called with the pointer 0x1234;
 * - BUG() when called with the pointer 0xb06;
 * - a 3 s interruptible sleep inside it with the pointer 0x5ee9 (for /proc/PID/stack).
 * It returns 1000 on success, so a caller tells it from the original (0).
 */
#include <linux/bug.h>
#include <linux/delay.h>
#include <linux/module.h>
#include <linux/smp.h>
#include <linux/syscalls.h>
#include <linux/topology.h>
#include <linux/uaccess.h>
#include "lucos.h"

static noinline long lucos_do_getcpu(unsigned __user *cpup, unsigned __user *nodep)
{
	unsigned int cpu = raw_smp_processor_id(), back;

	WARN_ONCE(cpup == (unsigned __user *)0x1234, "lucos getcpu: warning asked for");
	if (cpup == (unsigned __user *)0xb06)
		BUG();
	if (cpup == (unsigned __user *)0x5ee9)
		return msleep_interruptible(3000) ? -EINTR : 1001;
	if (!user_access_begin(cpup, sizeof(*cpup)))
		return -EFAULT;
	unsafe_put_user(cpu, cpup, efault);
	unsafe_get_user(back, cpup, efault);
	user_access_end();
	if (back != cpu)
		return -EFAULT;
	if (nodep && put_user(cpu_to_node(cpu), nodep))
		return -EFAULT;
	return 1000;
efault:
	user_access_end();
	return -EFAULT;
}

static long lucos_sys_getcpu(const struct pt_regs *regs)
{
	return lucos_do_getcpu((unsigned __user *)regs->di, (unsigned __user *)regs->si);
}

LUCOS_REPLACE(__x64_sys_getcpu, lucos_sys_getcpu);
LUCOS_PATCH("getcpu", "getcpu(2) with inline user accessors, WARN_ONCE and BUG (kernel tables)");
MODULE_LICENSE("GPL");
