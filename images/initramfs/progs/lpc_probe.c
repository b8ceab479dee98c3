// SPDX-License-Identifier: GPL-2.0
/*
 * lpc_probe NCPU KIND MS [BUCKET_MS]: the guest workload of bench/'s livepatch-compare.
 * Forks one worker per CPU 0..NCPU-1; each pins itself and, for MS milliseconds from a
 * common start, makes one request per iteration (KIND cmdline: pread of /proc/cmdline,
 * which runs cmdline_proc_show; uname: uname(2), which runs __x64_sys_newuname), reading
 * CLOCK_MONOTONIC after each. A request's latency is the time from the previous request's
 * end to its own end (closed loop: the request plus the loop's own clock read), so a stall
 * of the vCPU anywhere in the loop shows in it. Every latency of GAP_MIN or more is kept
 * as a gap; when the workers are done, the intersection of all workers' gaps gives the
 * all-vCPU stalls: intervals in which no vCPU completed a request.
 * Prints, in a few lines (the output goes over a serial console):
 *   lpc-window t0=NS dur=NS ncpu=N gap_min=NS overflow=0|1
 *     t0: CLOCK_MONOTONIC at the common start; every other time is in ns after t0
 *   lpc-probe cpu=C n=N first=old|new|none switch=NS flips=F mixed=M max=NS
 *     switch: first answer from the other code than the first answer's (-1: none)
 *   lpc-stalls START:LEN ...       all-vCPU stalls of GAP_MIN or more (the 256 longest), in us
 *   lpc-hist IDX:COUNT ...         latency histogram of all workers (see bucket_of)
 *   lpc-ts bucket_ms=B US ...      longest latency ending in each B ms bucket, in us
 * Freestanding (raw syscalls, no libc).
 */
#include "lpc.h"

#define SYS_mmap 9
#define SYS_sched_yield 24
#define SYS_fork 57
#define SYS_wait4 61
#define MAXCPU 64
#define MAXGAPS 131072
#define NHIST 1024
#define NBUCKETS 4096
#define GAP_MIN 10000UL
#define MAXSTALLS 256

struct worker {
	u64 n, max, flips, mixed, ngaps, overflow;
	long sw;
	int first;
	u64 gs[MAXGAPS], ge[MAXGAPS];
	u64 hist[NHIST];
	u64 series[NBUCKETS];
};
struct shared {
	volatile int ready, go;
	u64 t0;
	struct worker w[];
};

/* Log-linear: values below 16 exactly, then 16 buckets per power of two (~6%). */
static int bucket_of(u64 v)
{
	int e = 63 - __builtin_clzl(v | 1);
	if (v < 16)
		return (int)v;
	return (e - 3) * 16 + (int)((v >> (e - 4)) & 15);
}

static void work(struct shared *sh, struct worker *w, u64 cpu, const char *kind, u64 ms, u64 bucket_ns)
{
	static struct req r;
	u64 prev, end;
	int last = -1;

	pin(cpu);
	if (req_init(&r, kind))
		sys1(SYS_exit_group, 2);
	__atomic_add_fetch(&sh->ready, 1, __ATOMIC_SEQ_CST);
	while (!sh->go)
		__asm__ volatile("pause");
	prev = sh->t0;
	end = sh->t0 + ms * 1000000UL;
	w->first = -1;
	w->sw = -1;
	for (;;) {
		int s = req_do(&r);
		u64 t = now_ns(), lat = t - prev;

		w->n++;
		w->hist[bucket_of(lat)]++;
		if (lat > w->max)
			w->max = lat;
		if (lat >= GAP_MIN) {
			if (w->ngaps < MAXGAPS) {
				w->gs[w->ngaps] = prev;
				w->ge[w->ngaps++] = t;
			} else {
				w->overflow = 1;
			}
		}
		if (bucket_ns) {
			u64 b = (t - sh->t0) / bucket_ns;
			if (b < NBUCKETS && lat > w->series[b])
				w->series[b] = lat;
		}
		if (s == MIXED)
			w->mixed++;
		else if (w->first < 0)
			w->first = last = s;
		else if (s != last) {
			w->flips++;
			if (w->sw < 0)
				w->sw = (long)(t - sh->t0);
			last = s;
		}
		prev = t;
		if (t >= end)
			break;
	}
	sys1(SYS_exit_group, 0);
}

/* Intersection of two time-ordered lists of disjoint intervals; returns its length. */
static long isect(const u64 *as, const u64 *ae, long na, const u64 *bs, const u64 *be, long nb, u64 *os, u64 *oe)
{
	long i = 0, j = 0, k = 0;
	while (i < na && j < nb) {
		u64 s = as[i] > bs[j] ? as[i] : bs[j];
		u64 e = ae[i] < be[j] ? ae[i] : be[j];
		if (s < e) {
			os[k] = s;
			oe[k++] = e;
		}
		if (ae[i] < be[j])
			i++;
		else
			j++;
	}
	return k;
}

static u64 cs[2][MAXGAPS], ce[2][MAXGAPS];

int lpc_main(int argc, char **argv)
{
	struct shared *sh;
	u64 ncpu, ms, bucket_ns = 0, size, i, c, overflow = 0, min_len;
	long n, k;
	int cur = 0;

	if (argc < 4) {
		put("usage: lpc_probe NCPU cmdline|uname MS [BUCKET_MS]\n");
		return 2;
	}
	ncpu = parse_u64(argv[1]);
	ms = parse_u64(argv[3]);
	if (argc > 4)
		bucket_ns = parse_u64(argv[4]) * 1000000UL;
	if (ncpu < 1 || ncpu > MAXCPU) {
		put("lpc_probe: NCPU must be 1..64\n");
		return 2;
	}
	size = sizeof(struct shared) + ncpu * sizeof(struct worker);
	sh = (struct shared *)sys6(SYS_mmap, 0, (long)size, 3 /* read, write */, 0x21 /* shared, anonymous */, -1, 0);
	if ((long)sh < 0 && (long)sh > -4096)
		die("mmap", (long)sh);
	for (c = 0; c < ncpu; c++) {
		long pid = sys1(SYS_fork, 0);
		if (pid < 0)
			die("fork", pid);
		if (pid == 0)
			work(sh, &sh->w[c], c, argv[2], ms, bucket_ns);
	}
	while ((u64)sh->ready < ncpu)
		sys1(SYS_sched_yield, 0);
	sh->t0 = now_ns();
	__atomic_store_n(&sh->go, 1, __ATOMIC_SEQ_CST);
	for (c = 0; c < ncpu; c++) {
		int status = 0;
		if (sys4(SYS_wait4, -1, &status, 0, 0) < 0 || status != 0)
			die("lpc_probe: a worker failed", status);
	}

	/* All-vCPU stalls: the intersection of every worker's gaps. */
	n = (long)sh->w[0].ngaps;
	for (k = 0; k < n; k++) {
		cs[0][k] = sh->w[0].gs[k];
		ce[0][k] = sh->w[0].ge[k];
	}
	for (c = 1; c < ncpu; c++) {
		struct worker *w = &sh->w[c];
		n = isect(cs[cur], ce[cur], n, w->gs, w->ge, (long)w->ngaps, cs[!cur], ce[!cur]);
		cur = !cur;
	}
	for (c = 0; c < ncpu; c++)
		overflow |= sh->w[c].overflow;
	put("lpc-window t0="); putn(sh->t0); put(" dur="); putn(ms * 1000000UL); put(" ncpu="); putn(ncpu);
	put(" gap_min="); putn(GAP_MIN); put(" overflow="); putn(overflow); put("\n");
	for (c = 0; c < ncpu; c++) {
		struct worker *w = &sh->w[c];
		put("lpc-probe cpu="); putn(c); put(" n="); putn(w->n);
		put(" first="); put(w->first < 0 ? "none" : state_name(w->first));
		put(" switch="); putsn(w->sw); put(" flips="); putn(w->flips);
		put(" mixed="); putn(w->mixed); put(" max="); putn(w->max); put("\n");
	}
	/* The longest stalls: raise the bar until at most MAXSTALLS are left. */
	min_len = GAP_MIN;
	for (;;) {
		long count = 0;
		for (k = 0; k < n; k++)
			count += ce[cur][k] - cs[cur][k] >= min_len;
		if (count <= MAXSTALLS)
			break;
		min_len *= 2;
	}
	put("lpc-stalls");
	for (k = 0; k < n; k++)
		if (ce[cur][k] - cs[cur][k] >= min_len) {
			put(" "); putn((cs[cur][k] - sh->t0) / 1000); put(":"); putn((ce[cur][k] - cs[cur][k]) / 1000);
		}
	put("\nlpc-hist");
	for (i = 0; i < NHIST; i++) {
		u64 sum = 0;
		for (c = 0; c < ncpu; c++)
			sum += sh->w[c].hist[i];
		if (sum) { put(" "); putn(i); put(":"); putn(sum); }
	}
	put("\n");
	if (bucket_ns) {
		u64 nb = (ms * 1000000UL + bucket_ns - 1) / bucket_ns;
		put("lpc-ts bucket_ms="); putn(bucket_ns / 1000000UL);
		for (i = 0; i < nb && i < NBUCKETS; i++) {
			u64 m = 0;
			for (c = 0; c < ncpu; c++)
				if (sh->w[c].series[i] > m)
					m = sh->w[c].series[i];
			put(" "); putn(m / 1000);
		}
		put("\n");
	}
	return 0;
}
