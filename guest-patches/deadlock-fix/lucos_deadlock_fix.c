// SPDX-License-Identifier: GPL-2.0
/*
 * The LUCOS deadlock example: /proc/lucos_demo_lock (images/kernel-patches/0003-...)
 * returns -EINVAL with its lock still held when it is given a negative value, and every
 * later writer sleeps in down() forever.
 *
 * - The replacement write handler releases the lock on that path too.
 * - Fixing the code is not enough: the lock may be stuck already, with writers asleep
 *   inside the old function (so the patch could never commit). The apply callback, run
 *   by the update server right after the jump is installed, releases a stuck lock: one
 *   whose recorded holder is gone or asleep (the critical section never sleeps, so a
 *   sleeping or dead holder has left it without releasing). The blocked writers then
 *   finish in the old code, leave it, and the patch commits.
 * - The thread callback runs for each task that was still in the old function once it has
 *   left it, and logs it.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/sched.h>
#include <linux/sched/signal.h>
#include <linux/semaphore.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/atomic.h>
#include <linux/rcupdate.h>
#include <linux/pid.h>
#include "lucos.h"

extern struct semaphore lucos_demo_sem;
extern long lucos_demo_lock_value;
extern pid_t lucos_demo_lock_holder;
extern atomic_t lucos_demo_lock_waiters;

static ssize_t lucos_demo_lock_write_fixed(struct file *file, const char __user *ubuf,
					   size_t len, loff_t *ppos)
{
	char buf[32];
	long val;

	if (len >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, len))
		return -EFAULT;
	buf[len] = 0;
	if (kstrtol(strim(buf), 10, &val))
		return -EINVAL;
	atomic_inc(&lucos_demo_lock_waiters);
	down(&lucos_demo_sem);
	atomic_dec(&lucos_demo_lock_waiters);
	WRITE_ONCE(lucos_demo_lock_holder, task_pid_nr(current));
	if (val >= 0)
		WRITE_ONCE(lucos_demo_lock_value, val);
	WRITE_ONCE(lucos_demo_lock_holder, 0);
	up(&lucos_demo_sem);
	return val < 0 ? -EINVAL : len;
}

/* Apply callback (interrupt-like context): release the lock if it is stuck. */
static int release_stuck_lock(void)
{
	pid_t pid = READ_ONCE(lucos_demo_lock_holder);
	struct task_struct *t;
	bool stuck;

	if (!pid)
		return 0;		/* free, or held by a writer that will release it */
	rcu_read_lock();
	t = pid_task(find_pid_ns(pid, &init_pid_ns), PIDTYPE_PID);
	stuck = !t || t->exit_state || READ_ONCE(t->__state) != TASK_RUNNING;
	rcu_read_unlock();
	if (!stuck)
		return 0;
	pr_info("lucos deadlock-fix: releasing lucos_demo_sem, left held by pid %d\n", pid);
	WRITE_ONCE(lucos_demo_lock_holder, 0);
	up(&lucos_demo_sem);
	return 0;
}

/* Thread callback: a task that was inside the old handler has left it. */
static int old_writer_left(struct task_struct *t)
{
	pr_info("lucos deadlock-fix: task %d (%s) left the old lucos_demo_lock_write\n",
		t->pid, t->comm);
	return 0;
}

LUCOS_REPLACE(lucos_demo_lock_write, lucos_demo_lock_write_fixed);
LUCOS_APPLY_CALLBACK(release_stuck_lock);
LUCOS_THREAD_CALLBACK(old_writer_left);
LUCOS_PATCH("deadlock-fix", "lucos_demo_lock: release the lock on the -EINVAL path; free a stuck lock");
MODULE_LICENSE("GPL");
