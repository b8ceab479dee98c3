// SPDX-License-Identifier: GPL-2.0
/*
 * stable_probe MODE: shows from userspace whether the running kernel has one of the real
 * 6.1 stable fixes that the guest image is built without (images/kernel-patches) and
 * lucos-build re-applies live (images/stable-fixes). Prints one line
 * "stable_probe MODE: ... fixed=0|1". Run as root. Freestanding (raw syscalls, no libc).
 *
 *   rwhint  fcntl(F_SET_RW_HINT) on an immutable file (on a fresh tmpfs): 0 with the bug,
 *           -EPERM fixed
 *   tmpfile open(O_TMPFILE) by init's root in a tmpfs owned by a user namespace in which
 *           uid/gid 0 are not mapped: a file with the bug, -EOVERFLOW fixed
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
#define CLONE_NEWNS 0x20000
#define CLONE_NEWUSER 0x10000000
#define O_TMPFILE 020200000
#define SYS_pipe 22
#define SYS_fork 57
#define SYS_getpid 39
#define EOVERFLOW 75
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
	long fd, flags = 0, hint = RWH_WRITE_LIFE_SHORT, r;

	sys2(SYS_mkdir, "/tmp/stable_probe.rwhint", 0755);
	sys6(SYS_mount, (long)"none", (long)"/tmp/stable_probe.rwhint", (long)"tmpfs", 0, 0, 0);
	fd = sys3(SYS_open, "/tmp/stable_probe.rwhint/f", O_CREAT | O_RDWR, 0644);
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

static int len(const char *s)
{
	int n = 0;

	while (s[n])
		n++;
	return n;
}

static void put_dec(char *b, long v)
{
	char t[24];
	int i = 0, j = 0;

	do {
		t[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		b[j++] = t[--i];
	b[j] = 0;
}

static long write_file(const char *path, const char *text)
{
	long fd = sys2(SYS_open, path, O_WRONLY), r;

	if (fd < 0)
		return fd;
	r = sys3(SYS_write, fd, text, len(text));
	sys1(SYS_close, fd);
	return r;
}

static int tmpfile(void)
{
	int up[2], down[2];
	char c = 0, path[64], pid_s[24];
	long pid, r;
	int status;

	sys2(SYS_mkdir, "/tmp/stable_probe.tmpfile", 0777);
	if (sys1(SYS_pipe, up) < 0 || sys1(SYS_pipe, down) < 0)
		return out("tmpfile", "pipe", -1, 0), 2;
	pid = sys1(SYS_fork, 0);
	if (pid == 0) {
		/* A user namespace whose root is uid 1000 outside, with a tmpfs of its own. */
		r = sys1(SYS_unshare, CLONE_NEWUSER | CLONE_NEWNS);
		sys3(SYS_write, up[1], r < 0 ? "u" : "1", 1);
		sys3(SYS_read, down[0], &c, 1);
		r = sys6(SYS_mount, (long)"none", (long)"/tmp/stable_probe.tmpfile", (long)"tmpfs", 0, (long)"mode=1777", 0);
		sys3(SYS_write, up[1], r < 0 ? "m" : "2", 1);
		sys3(SYS_read, down[0], &c, 1);
		sys1(SYS_exit, 0);
	}
	if (pid < 0)
		return out("tmpfile", "fork", pid, 0), 2;
	sys3(SYS_read, up[0], &c, 1);
	if (c != '1')
		return out("tmpfile", "unshare", -1, 0), 2;
	put_dec(pid_s, pid);
	memcpy(path, "/proc/", 6);
	memcpy(path + 6, pid_s, len(pid_s) + 1);
	memcpy(path + 6 + len(pid_s), "/uid_map", 9);
	r = write_file(path, "0 1000 1");
	memcpy(path + 6 + len(pid_s), "/gid_map", 9);
	if (r >= 0)
		r = write_file(path, "0 1000 1");
	if (r < 0)
		return out("tmpfile", "id-map", r, 0), 2;
	sys3(SYS_write, down[1], "g", 1);
	sys3(SYS_read, up[0], &c, 1);
	if (c != '2')
		return out("tmpfile", "mount", -1, 0), 2;
	/* As init's root (uid 0, not mapped in the tmpfs' namespace), through the child's root. */
	memcpy(path + 6 + len(pid_s), "/root/tmp/stable_probe.tmpfile", 31);
	r = sys3(SYS_open, path, O_TMPFILE | O_RDWR, 0600);
	if (r >= 0)
		sys1(SYS_close, r);
	sys3(SYS_write, down[1], "x", 1);
	sys4(SYS_wait4, pid, &status, 0, 0);
	out("tmpfile", "ret", r < 0 ? r : 0, r == -EOVERFLOW);
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
	if (argc == 2 && seq(argv[1], "tmpfile"))
		return tmpfile();
	if (argc == 2 && seq(argv[1], "cgkill"))
		return cgkill();
	put("usage: stable_probe rwhint|tmpfile|cgkill\n");
	flush();
	return 2;
}
