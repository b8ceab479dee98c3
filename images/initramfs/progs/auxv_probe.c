// SPDX-License-Identifier: GPL-2.0
/*
 * auxv_probe: sets a one-entry auxiliary vector with prctl(PR_SET_MM, PR_SET_MM_AUXV)
 * (needs CAP_SYS_RESOURCE: run as root) and reads /proc/self/auxv back.
 * Prints "auxv_probe: prctl=R bytes=N first=T:V" where N is the size /proc/self/auxv
 * returned: 32 (the entry and the forced AT_NULL) on a fixed kernel; more on a kernel with
 * the "PR_SET_MM_AUXV losing the forced AT_NULL terminator" bug, where the stale rest of
 * the original vector follows the new entry.
 * Freestanding (raw syscalls, no libc), like uname_loop.
 */
typedef unsigned long u64;

static long sys3(long n, long a, long b, long c) { long r; __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory"); return r; }
static long sys5(long n, long a, long b, long c, long d, long e)
{
	long r;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8) : "rcx", "r11", "memory");
	return r;
}

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_prctl 157
#define SYS_exit_group 231
#define PR_SET_MM 35
#define PR_SET_MM_AUXV 12
#define AT_PAGESZ 6

static int len(const char *s) { int n = 0; while (s[n]) n++; return n; }
static void put(const char *s) { sys3(SYS_write, 1, (long)s, len(s)); }
static void putn(long v) { char b[24]; int i = 23; int neg = v < 0; u64 u = neg ? -v : v; b[i] = 0; do { b[--i] = '0' + u % 10; u /= 10; } while (u); if (neg) b[--i] = '-'; put(b + i); }

__attribute__((force_align_arg_pointer)) void _start(void)
{
	u64 vec[2] = { AT_PAGESZ, 4096 };
	u64 buf[128];
	long r, fd, n = 0, got;

	r = sys5(SYS_prctl, PR_SET_MM, PR_SET_MM_AUXV, (long)vec, sizeof(vec), 0);
	fd = sys3(SYS_open, (long)"/proc/self/auxv", 0, 0);
	if (fd < 0) { put("auxv_probe: cannot open /proc/self/auxv\n"); sys3(SYS_exit_group, 2, 0, 0); }
	while ((got = sys3(SYS_read, fd, (long)buf + n, sizeof(buf) - n)) > 0)
		n += got;
	put("auxv_probe: prctl="); putn(r); put(" bytes="); putn(n);
	put(" first="); putn(buf[0]); put(":"); putn(buf[1]); put("\n");
	sys3(SYS_exit_group, r == 0 ? 0 : 1, 0, 0);
}
