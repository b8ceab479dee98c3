// SPDX-License-Identifier: GPL-2.0
/*
 * uname_loop: calls uname(2) in a tight loop until /tmp/stop exists and classifies every
 * result: "old" (sysname Linux, release R), "new" (sysname LUCOS, release R+lucos) or
 * "mixed" (anything else). R is taken from the first call, which must be old.
 * Prints "uname_loop: calls=N old=A new=B mixed=C" and exits 0 if mixed is 0.
 * Freestanding (raw syscalls, no libc), so it runs the same under any CPUID.
 */
typedef unsigned long u64;

struct utsname { char sysname[65], nodename[65], release[65], version[65], machine[65], domain[65]; };

static long sys1(long n, long a) { long r; __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a) : "rcx", "r11", "memory"); return r; }
static long sys2(long n, long a, long b) { long r; __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b) : "rcx", "r11", "memory"); return r; }
static long sys3(long n, long a, long b, long c) { long r; __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory"); return r; }

#define SYS_write 1
#define SYS_access 21
#define SYS_uname 63
#define SYS_exit_group 231

static int eq(const char *a, const char *b) { while (*a && *a == *b) { a++; b++; } return *a == *b; }
static int len(const char *s) { int n = 0; while (s[n]) n++; return n; }
static void put(const char *s) { sys3(SYS_write, 1, (long)s, len(s)); }
static void putn(u64 v) { char b[24]; int i = 23; b[i] = 0; do { b[--i] = '0' + v % 10; v /= 10; } while (v); put(b + i); }

void _start(void)
{
	struct utsname u;
	char rel[80], relnew[80];
	u64 calls = 0, old = 0, new = 0, mixed = 0;
	int i;

	sys1(SYS_uname, (long)&u);
	if (!eq(u.sysname, "Linux")) { put("uname_loop: first call not old\n"); sys1(SYS_exit_group, 2); }
	for (i = 0; u.release[i]; i++) rel[i] = relnew[i] = u.release[i];
	rel[i] = 0;
	relnew[i] = '+'; relnew[i + 1] = 'l'; relnew[i + 2] = 'u'; relnew[i + 3] = 'c';
	relnew[i + 4] = 'o'; relnew[i + 5] = 's'; relnew[i + 6] = 0;
	put("uname_loop: running\n");
	for (;;) {
		long r = sys1(SYS_uname, (long)&u);
		calls++;
		if (r == 0 && eq(u.sysname, "Linux") && eq(u.release, rel))
			old++;
		else if (r == 0 && eq(u.sysname, "LUCOS") && eq(u.release, relnew))
			new++;
		else
			mixed++;
		if ((calls & 255) == 0 && sys2(SYS_access, (long)"/tmp/stop", 0) == 0)
			break;
	}
	put("uname_loop: calls="); putn(calls); put(" old="); putn(old);
	put(" new="); putn(new); put(" mixed="); putn(mixed); put("\n");
	sys1(SYS_exit_group, mixed ? 1 : 0);
}
