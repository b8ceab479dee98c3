/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared helpers of the lpc_* guest programs (bench/'s livepatch-compare): raw system
 * calls, a monotonic clock, pinning, buffered output and argument parsing. Freestanding
 * (no libc), like uname_loop: each program includes this header once.
 */
typedef unsigned long u64;
#define LPC_FN static __attribute__((unused))

LPC_FN long sys6(long n, long a, long b, long c, long d, long e, long f)
{
	long r;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	register long r9 __asm__("r9") = f;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return r;
}
#define sys1(n, a) sys6(n, (long)(a), 0, 0, 0, 0, 0)
#define sys2(n, a, b) sys6(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sys4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_lseek 8
#define SYS_pread64 17
#define SYS_nanosleep 35
#define SYS_uname 63
#define SYS_delete_module 176
#define SYS_sched_setaffinity 203
#define SYS_clock_gettime 228
#define SYS_exit_group 231
#define SYS_finit_module 313
#define CLOCK_MONOTONIC 1
#define O_RDONLY 0
#define O_WRONLY 1
#define O_NONBLOCK 04000
#define SEEK_END 2
#define EAGAIN 11
#define EBUSY 16

/* gcc may emit calls to these even when freestanding. */
void *memset(void *d, int c, unsigned long n)
{
	volatile char *p = d;
	while (n--)
		*p++ = (char)c;
	return d;
}
void *memcpy(void *d, const void *s, unsigned long n)
{
	volatile char *p = d;
	const char *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

struct lpc_ts { long sec, nsec; };
LPC_FN u64 now_ns(void)
{
	struct lpc_ts t;
	sys2(SYS_clock_gettime, CLOCK_MONOTONIC, &t);
	return (u64)t.sec * 1000000000UL + (u64)t.nsec;
}
LPC_FN void sleep_ms(long ms)
{
	struct lpc_ts t = { ms / 1000, (ms % 1000) * 1000000L };
	sys2(SYS_nanosleep, &t, 0);
}

LPC_FN int seq(const char *a, const char *b) { while (*a && *a == *b) { a++; b++; } return *a == *b; }
LPC_FN int prefix(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }
LPC_FN int contains(const char *s, const char *needle)
{
	for (; *s; s++)
		if (prefix(s, needle))
			return 1;
	return 0;
}
LPC_FN u64 parse_u64(const char *s)
{
	u64 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u64)(*s++ - '0');
	return v;
}

/* Output, buffered: one write(2) per 4 KiB or at flush. */
static char obuf[4096];
static int olen;
LPC_FN void flush(void) { if (olen) sys3(SYS_write, 1, obuf, olen); olen = 0; }
LPC_FN void putc_(char c) { if (olen == sizeof(obuf)) flush(); obuf[olen++] = c; }
LPC_FN void put(const char *s) { while (*s) putc_(*s++); }
LPC_FN void putn(u64 v) { char b[24]; int i = 23; b[i] = 0; do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v); put(b + i); }
LPC_FN void putsn(long v) { if (v < 0) { putc_('-'); putn((u64)-v); } else putn((u64)v); }
LPC_FN void die(const char *what, long err)
{
	put(what); put(": error "); putsn(err); put("\n"); flush();
	sys1(SYS_exit_group, 1);
}

/* Pins the calling thread to one CPU. */
LPC_FN void pin(u64 cpu)
{
	static u64 mask[16];
	long r;
	if (cpu >= 1024)
		die("pin: cpu out of range", (long)cpu);
	mask[cpu / 64] = 1UL << (cpu % 64);
	r = sys3(SYS_sched_setaffinity, 0, sizeof(mask), mask);
	if (r < 0)
		die("sched_setaffinity", r);
}

/* Entry: argc and argv from the initial stack. */
int lpc_main(int argc, char **argv);
__asm__(".text\n.global _start\n_start:\n\txor %rbp, %rbp\n\tmov (%rsp), %rdi\n\tlea 8(%rsp), %rsi\n"
	"\tand $-16, %rsp\n\tcall lpc_main_entry\n\thlt\n");
void lpc_main_entry(long argc, char **argv);
void lpc_main_entry(long argc, char **argv)
{
	int r = lpc_main((int)argc, argv);
	flush();
	sys1(SYS_exit_group, r);
}

/* The request the workload and the cost loop make, on the function a patch replaces. */
enum { OLD = 0, NEW = 1, MIXED = 2 };
struct utsname { char sysname[65], nodename[65], release[65], version[65], machine[65], domain[65]; };
struct req {
	int kind; /* 0: pread /proc/cmdline (cmdline_proc_show), 1: uname(2) */
	long fd;
	char buf[1024];
	struct utsname u;
};
LPC_FN int req_init(struct req *r, const char *kind)
{
	if (seq(kind, "cmdline")) {
		r->kind = 0;
		r->fd = sys3(SYS_open, "/proc/cmdline", O_RDONLY, 0);
		if (r->fd < 0)
			die("open /proc/cmdline", r->fd);
		return 0;
	}
	if (seq(kind, "uname")) {
		r->kind = 1;
		return 0;
	}
	put("unknown kind (want cmdline or uname): "); put(kind); put("\n");
	return -1;
}
/* One request; classifies the answer as the old code's, a patch's, or neither. */
LPC_FN int req_do(struct req *r)
{
	if (r->kind == 0) {
		long n = sys4(SYS_pread64, r->fd, r->buf, sizeof(r->buf) - 1, 0);
		if (n <= 0)
			return MIXED;
		r->buf[n] = 0;
		/* lucos's cmdline patch prefixes the line; livepatch-sample.ko replaces it. */
		if (prefix(r->buf, "lucos-patched ") || prefix(r->buf, "this has been live patched"))
			return NEW;
		return OLD;
	}
	if (sys1(SYS_uname, &r->u) != 0)
		return MIXED;
	if (seq(r->u.sysname, "Linux") && !contains(r->u.release, "+lucos"))
		return OLD;
	if (seq(r->u.sysname, "LUCOS") && contains(r->u.release, "+lucos"))
		return NEW;
	return MIXED;
}
LPC_FN const char *state_name(int s) { return s == OLD ? "old" : s == NEW ? "new" : "mixed"; }
