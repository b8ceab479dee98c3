// SPDX-License-Identifier: GPL-2.0
/*
 * livepatch-uname.c - a Linux livepatch (CONFIG_LIVEPATCH) of the uname(2) entry, for
 * bench/'s livepatch-compare. Modelled on samples/livepatch/livepatch-sample.c. Replaces
 * __x64_sys_newuname with the same code as lucos's guest-patches/uname: sysname becomes
 * "LUCOS" and release gains a "+lucos" suffix, both in the same call.
 *
 * The original copies utsname under uts_sem, which vmlinux does not export, and a
 * livepatch module cannot link against it (no klp-convert here). Its address is therefore
 * a parameter, checked against kallsyms before the patch is enabled:
 *
 *   insmod livepatch-uname.ko uts_sem_addr=0x$(grep ' uts_sem$' /proc/kallsyms | cut -d' ' -f1)
 *   echo 0 > /sys/kernel/livepatch/livepatch_uname/enabled && rmmod livepatch_uname
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/kallsyms.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/module.h>
#include <linux/rwsem.h>
#include <linux/sched.h>
#include <linux/string.h>
#include <linux/syscalls.h>
#include <linux/uaccess.h>
#include <linux/utsname.h>

static unsigned long uts_sem_addr;
module_param(uts_sem_addr, ulong, 0400);
MODULE_PARM_DESC(uts_sem_addr, "address of uts_sem (from /proc/kallsyms)");

static struct rw_semaphore *uts_sem_p;

static long livepatch_sys_newuname(const struct pt_regs *regs)
{
	struct new_utsname __user *name = (struct new_utsname __user *)regs->di;
	struct new_utsname tmp;

	down_read(uts_sem_p);
	memcpy(&tmp, utsname(), sizeof(tmp));
	up_read(uts_sem_p);
	strscpy(tmp.sysname, "LUCOS", sizeof(tmp.sysname));
	strlcat(tmp.release, "+lucos", sizeof(tmp.release));
	if (copy_to_user(name, &tmp, sizeof(tmp)))
		return -EFAULT;
	return 0;
}

static struct klp_func funcs[] = {
	{
		.old_name = "__x64_sys_newuname",
		.new_func = livepatch_sys_newuname,
	}, { }
};

static struct klp_object objs[] = {
	{
		/* name being NULL means vmlinux */
		.funcs = funcs,
	}, { }
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int livepatch_init(void)
{
	char sym[KSYM_SYMBOL_LEN];

	if (!uts_sem_addr) {
		pr_err("uts_sem_addr= is required\n");
		return -EINVAL;
	}
	sprint_symbol(sym, uts_sem_addr);
	if (strncmp(sym, "uts_sem+0x0/", 12)) {
		pr_err("uts_sem_addr=%#lx is %s, not uts_sem\n", uts_sem_addr, sym);
		return -EINVAL;
	}
	uts_sem_p = (struct rw_semaphore *)uts_sem_addr;
	return klp_enable_patch(&patch);
}

static void livepatch_exit(void)
{
}

module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
