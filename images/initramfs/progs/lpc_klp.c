// SPDX-License-Identifier: GPL-2.0
/*
 * lpc_klp: applies and reverts a Linux livepatch module with timestamps, for bench/'s
 * livepatch-compare.
 *   lpc_klp load KO NAME [PARAMS]   finit_module(KO, PARAMS), then waits until
 *                                   /sys/kernel/livepatch/NAME/transition reads 0
 *   lpc_klp unload NAME             writes 0 to .../NAME/enabled, waits for transition 0,
 *                                   then delete_module(NAME) (what rmmod does)
 *   lpc_klp now                     prints CLOCK_MONOTONIC in ns
 * Prints "lpc-klp op=load|unload t0=NS KEY=REL ..." with t0 the CLOCK_MONOTONIC time (ns)
 * the operation began and each REL in ns after t0: loaded (finit_module returned) or
 * disabled (the write to enabled returned), started (livepatch's "starting ...
 * transition" message), done (its "... complete" message: transition is 0 from then on),
 * polled (when the sysfs poll saw 0) and removed (unload: delete_module succeeded).
 * The transition file is polled every millisecond, which this kernel (no high-resolution
 * timers, HZ=100) rounds up to 10 ms; "started" and "done" are therefore taken from the
 * timestamps of the kernel's own messages in /dev/kmsg, mapped to CLOCK_MONOTONIC with a
 * mark this program writes there just before it starts (src=kmsg; src=poll when the
 * messages were not found).
 * Freestanding (raw syscalls, no libc).
 */
#include "lpc.h"

#define SYS_sched_yield 24

static long kmsg_r = -1;
static char rec[2048];

/* Reads kmsg records until none is left; for each that contains one of the needles,
 * stores its timestamp (us) in the needle's slot (the first match wins). */
static void kmsg_scan(const char **needles, u64 *ts_us, int n)
{
	for (;;) {
		long got = sys3(SYS_read, kmsg_r, rec, sizeof(rec) - 1);
		const char *p = rec, *msg;
		u64 ts;
		int commas = 0, i;

		if (got == -32) /* EPIPE: records were overwritten; go on */
			continue;
		if (got <= 0)
			return;
		rec[got] = 0;
		while (*p && commas < 2)
			if (*p++ == ',')
				commas++;
		ts = parse_u64(p);
		msg = p;
		while (*msg && *msg != ';')
			msg++;
		for (i = 0; i < n; i++)
			if (!ts_us[i] && contains(msg, needles[i]))
				ts_us[i] = ts;
	}
}

/* Writes a mark into the kernel log; returns kmsg-time minus CLOCK_MONOTONIC, in ns. */
static long kmsg_offset(void)
{
	static const char mark[] = "lpc_klp: clock mark\n";
	const char *needles[1] = { "lpc_klp: clock mark" };
	u64 ts[1] = { 0 }, a, b;
	long w = sys3(SYS_open, "/dev/kmsg", O_WRONLY, 0);

	kmsg_r = sys3(SYS_open, "/dev/kmsg", O_RDONLY | O_NONBLOCK, 0);
	if (w < 0 || kmsg_r < 0)
		die("open /dev/kmsg", w < 0 ? w : kmsg_r);
	sys3(SYS_lseek, kmsg_r, 0, SEEK_END);
	a = now_ns();
	sys3(SYS_write, w, mark, sizeof(mark) - 1);
	b = now_ns();
	sys1(SYS_close, w);
	kmsg_scan(needles, ts, 1);
	if (!ts[0])
		return 0;
	return (long)(ts[0] * 1000) - (long)(a + (b - a) / 2);
}

static void path_of(char *out, const char *name, const char *file)
{
	const char *parts[4] = { "/sys/kernel/livepatch/", name, "/", file };
	int i, o = 0;
	for (i = 0; i < 4; i++)
		for (const char *s = parts[i]; *s && o < 250; s++)
			out[o++] = *s;
	out[o] = 0;
}

/* Polls NAME's transition file until it reads 0 or is gone; returns when it saw that. */
static u64 wait_transition(const char *name)
{
	char path[256], v[8];
	u64 start = now_ns();

	path_of(path, name, "transition");
	for (;;) {
		long fd = sys3(SYS_open, path, O_RDONLY, 0), n = 0;
		if (fd >= 0) {
			n = sys3(SYS_read, fd, v, sizeof(v));
			sys1(SYS_close, fd);
		}
		if (fd < 0 || (n > 0 && v[0] == '0'))
			return now_ns();
		if (now_ns() - start > 300000000000UL)
			die("transition did not finish within 300 s", 0);
		sleep_ms(1);
	}
}

static void report(const char *key, u64 t, u64 t0)
{
	put(" "); put(key); put("="); putsn(t ? (long)(t - t0) : -1);
}

int lpc_main(int argc, char **argv)
{
	const char *needles[2];
	u64 ts[2] = { 0, 0 }, t0, t1, polled, removed = 0, kstart = 0, kdone = 0;
	long off, r;
	int load;

	if (argc == 2 && seq(argv[1], "now")) {
		put("lpc-now "); putn(now_ns()); put("\n");
		return 0;
	}
	load = argc >= 4 && seq(argv[1], "load");
	if (!load && !(argc == 3 && seq(argv[1], "unload"))) {
		put("usage: lpc_klp load KO NAME [PARAMS] | unload NAME | now\n");
		return 2;
	}
	if (load) {
		long fd = sys3(SYS_open, argv[2], O_RDONLY, 0);
		if (fd < 0)
			die("open module", fd);
		needles[0] = "starting patching transition";
		needles[1] = "patching complete";
		off = kmsg_offset();
		t0 = now_ns();
		r = sys3(SYS_finit_module, fd, argc > 4 ? argv[4] : "", 0);
		t1 = now_ns();
		if (r < 0)
			die("finit_module", r);
		polled = wait_transition(argv[3]);
	} else {
		char path[256];
		long fd;
		path_of(path, argv[2], "enabled");
		fd = sys3(SYS_open, path, O_WRONLY, 0);
		if (fd < 0)
			die("open enabled", fd);
		needles[0] = "starting unpatching transition";
		needles[1] = "unpatching complete";
		off = kmsg_offset();
		t0 = now_ns();
		r = sys3(SYS_write, fd, "0", 1);
		t1 = now_ns();
		if (r < 0)
			die("write enabled", r);
		sys1(SYS_close, fd);
		polled = wait_transition(argv[2]);
		/* The patch drops its module reference from a work item: retry while busy. */
		for (;;) {
			r = sys2(SYS_delete_module, argv[2], O_NONBLOCK);
			if (r == 0)
				break;
			if (r != -EAGAIN && r != -EBUSY)
				die("delete_module", r);
			if (now_ns() - t0 > 300000000000UL)
				die("delete_module still busy after 300 s", r);
			sys1(SYS_sched_yield, 0);
		}
		removed = now_ns();
	}
	kmsg_scan(needles, ts, 2);
	if (off && ts[0])
		kstart = (u64)((long)(ts[0] * 1000) - off);
	if (off && ts[1])
		kdone = (u64)((long)(ts[1] * 1000) - off);
	put("lpc-klp op="); put(load ? "load" : "unload"); put(" t0="); putn(t0);
	report(load ? "loaded" : "disabled", t1, t0);
	report("started", kstart, t0);
	report("done", kdone ? kdone : polled, t0);
	report("polled", polled, t0);
	if (!load)
		report("removed", removed, t0);
	put(kdone ? " src=kmsg\n" : " src=poll\n");
	return 0;
}
