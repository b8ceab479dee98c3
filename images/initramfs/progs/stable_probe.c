// SPDX-License-Identifier: GPL-2.0
/*
 * stable_probe MODE: shows from userspace whether the running kernel has one of the real
 * 6.1 stable fixes that the guest image is built without (images/kernel-patches) and
 * lucos-build re-applies live (images/stable-fixes). Prints one line
 * "stable_probe MODE: ... fixed=0|1". Run as root. Freestanding (raw syscalls, no libc).
 *
 *   rwhint  fcntl(F_SET_RW_HINT) on an immutable tmpfs file: 0 with the bug, -EPERM fixed
 *   timens  write "1 0 2000000000" to /proc/self/timens_offsets after unshare(CLONE_NEWTIME):
 *           accepted with the bug (a nanosecond offset of two seconds), -EINVAL fixed
 *   cgkill  clone3(CLONE_INTO_CGROUP) into an empty cgroup that was once killed through
 *           cgroup.kill: the child is SIGKILLed with the bug, exits normally fixed
 */
#include "lpc.h"

#define SYS_ioctl 16
#define SYS_fcntl 72
#define SYS_mkdir 83
#define SYS_wait4 61
#define SYS_mount 165
#define SYS_unshare 272
#define SYS_clone3 435
#define SYS_exit 60
#define O_CREAT 0100
#define O_RDWR 2
#define O_DIRECTORY 0200000
#define F_SET_RW_HINT 1036
#define RWH_WRITE_LIFE_SHORT 2
#define FS_IOC_GETFLAGS 0x80086601
#define FS_IOC_SETFLAGS 0x40086602
#define FS_IMMUTABLE_FL 0x10
#define CLONE_NEWTIME 0x80
#define CLONE_INTO_CGROUP 0x200000000UL
#define SIGCHLD 17
#define EPERM 1
#define EINVAL 22

static long out(const char *mode, const char *what, long v, int fixed)
{
	put("stable_probe ");
	put(mode);
	put(": ");
	put(what);
	put("=");
	putsn(v);
	put(" fixed=");
	putsn(fixed);
	put("\n");
	flush();
	return 0;
}

static int rwhint(void)
{
	long fd = sys3(SYS_open, "/tmp/stable_probe.rwhint", O_CREAT | O_RDWR, 0644);
	long flags = 0, hint = RWH_WRITE_LIFE_SHORT, r;

	if (fd < 0)
		return out("rwhint", "open", fd, 0), 2;
	sys3(SYS_ioctl, fd, FS_IOC_GETFLAGS, &flags);
	flags |= FS_IMMUTABLE_FL;
	r = sys3(SYS_ioctl, fd, FS_IOC_SETFLAGS, &flags);
	if (r < 0)
		return out("rwhint", "setflags", r, 0), 2;
	r = sys3(SYS_fcntl, fd, F_SET_RW_HINT, &hint);
	flags &= ~FS_IMMUTABLE_FL;
	sys3(SYS_ioctl, fd, FS_IOC_SETFLAGS, &flags);
	sys1(SYS_close, fd);
	out("rwhint", "ret", r, r == -EPERM);
	return 0;
}

static int timens(void)
{
	static const char line[] = "1 0 2000000000\n";
	long r = sys1(SYS_unshare, CLONE_NEWTIME), fd;

	if (r < 0)
		return out("timens", "unshare", r, 0), 2;
	fd = sys2(SYS_open, "/proc/self/timens_offsets", O_WRONLY);
	if (fd < 0)
		return out("timens", "open", fd, 0), 2;
	r = sys3(SYS_write, fd, line, sizeof(line) - 1);
	sys1(SYS_close, fd);
	out("timens", "ret", r, r == -EINVAL);
	return 0;
}

struct clone_args {
	u64 flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup;
};

static int cgkill(void)
{
	struct clone_args a;
	long fd, r, pid;
	int status = 0;

	sys2(SYS_mkdir, "/sys/fs/cgroup", 0755);
	sys6(SYS_mount, (long)"none", (long)"/sys/fs/cgroup", (long)"cgroup2", 0, 0, 0);
	sys2(SYS_mkdir, "/sys/fs/cgroup/stable_probe", 0755);
	fd = sys2(SYS_open, "/sys/fs/cgroup/stable_probe/cgroup.kill", O_WRONLY);
	if (fd < 0)
		return out("cgkill", "open-kill", fd, 0), 2;
	r = sys3(SYS_write, fd, "1", 1);
	sys1(SYS_close, fd);
	if (r < 0)
		return out("cgkill", "kill", r, 0), 2;
	fd = sys2(SYS_open, "/sys/fs/cgroup/stable_probe", O_RDONLY | O_DIRECTORY);
	if (fd < 0)
		return out("cgkill", "open-cgroup", fd, 0), 2;
	memset(&a, 0, sizeof(a));
	a.flags = CLONE_INTO_CGROUP;
	a.exit_signal = SIGCHLD;
	a.cgroup = fd;
	pid = sys2(SYS_clone3, &a, sizeof(a));
	if (pid == 0)
		sys1(SYS_exit, 7);
	if (pid < 0)
		return out("cgkill", "clone3", pid, 0), 2;
	sys4(SYS_wait4, pid, &status, 0, 0);
	/* status: exited with 7 -> 0x0700; killed by SIGKILL -> 9. */
	out("cgkill", "status", status, status == 0x0700);
	return 0;
}

int lpc_main(int argc, char **argv)
{
	if (argc == 2 && seq(argv[1], "rwhint"))
		return rwhint();
	if (argc == 2 && seq(argv[1], "timens"))
		return timens();
	if (argc == 2 && seq(argv[1], "cgkill"))
		return cgkill();
	put("usage: stable_probe rwhint|timens|cgkill\n");
	flush();
	return 2;
}
