// SPDX-License-Identifier: GPL-2.0
/*
 * lpc_cost CPU KIND MS: cost per call of a patched (or unpatched) function, for bench/'s
 * livepatch-compare. Pins itself to CPU, warms up, then makes KIND requests (cmdline:
 * pread of /proc/cmdline; uname: uname(2); see lpc.h) in a tight loop for MS milliseconds,
 * timing each chunk of 32 calls.
 * Prints "lpc-cost kind=K calls=N ns=NS chunk=32 med=NS min=NS state=old|new|mixed"
 * (ns: total time of the N calls; med, min: the median and the fastest chunk, robust to
 * the vCPU being preempted now and then; state: what the last answer came from).
 * Freestanding (raw syscalls, no libc).
 */
#include "lpc.h"

#define CHUNK 32
#define MAXCHUNKS 65536

static u64 chunks[MAXCHUNKS];

/* The k-th smallest of v[0..n) (reorders v). */
static u64 select_kth(u64 *v, long n, long k)
{
	long lo = 0, hi = n - 1;
	while (lo < hi) {
		u64 pivot = v[(lo + hi) / 2], t;
		long i = lo, j = hi;
		while (i <= j) {
			while (v[i] < pivot) i++;
			while (v[j] > pivot) j--;
			if (i <= j) { t = v[i]; v[i] = v[j]; v[j] = t; i++; j--; }
		}
		if (k <= j) hi = j;
		else if (k >= i) lo = i;
		else return v[k];
	}
	return v[k];
}

int lpc_main(int argc, char **argv)
{
	static struct req r;
	u64 ms, t0, prev, t, calls = 0, min = ~0UL;
	long n = 0;
	int s = MIXED, i;

	if (argc < 4) {
		put("usage: lpc_cost CPU cmdline|uname MS\n");
		return 2;
	}
	pin(parse_u64(argv[1]));
	ms = parse_u64(argv[3]);
	if (req_init(&r, argv[2]))
		return 2;
	for (i = 0; i < 1000; i++)
		req_do(&r);
	t0 = prev = now_ns();
	do {
		for (i = 0; i < CHUNK; i++)
			s = req_do(&r);
		calls += CHUNK;
		t = now_ns();
		chunks[n++] = t - prev;
		if (t - prev < min)
			min = t - prev;
		prev = t;
	} while (t - t0 < ms * 1000000UL && n < MAXCHUNKS);
	put("lpc-cost kind="); put(argv[2]); put(" calls="); putn(calls);
	put(" ns="); putn(t - t0); put(" chunk="); putn(CHUNK);
	put(" med="); putn(select_kth(chunks, n, n / 2)); put(" min="); putn(min);
	put(" state="); put(state_name(s)); put("\n");
	return 0;
}
