// SPDX-License-Identifier: GPL-2.0
/*
 * getcpu_probe: calls getcpu(2) as a raw syscall (not the vDSO) with a valid pointer, NULL,
 * an unmapped address and the lucos getcpu patch's WARN trigger, and prints one line each:
 *   getcpu_probe valid ret=R cpu=C
 *   getcpu_probe null ret=R
 *   getcpu_probe unmapped ret=R
 *   getcpu_probe warn ret=R
 * then "getcpu_probe done". With the argument "bug" it makes the one call that hits the
 * patch's BUG() instead ("getcpu_probe bug ret=R" would only print if it returned); with
 * "sleep", the call that sleeps 3 s inside the patch.
 * The kernel's getcpu returns 0 and skips a NULL pointer; the patched one returns 1000
 * and writes through every pointer, so NULL and unmapped ones fault inside patch code.
 */
#include "lpc.h"

#define SYS_getcpu 309

static void call(const char *what, long ptr, int show_cpu)
{
	unsigned cpu = 12345;
	long r = sys3(SYS_getcpu, ptr ? ptr : 0, 0, 0);
	if (show_cpu)
		r = sys3(SYS_getcpu, (long)&cpu, 0, 0);
	put("getcpu_probe "); put(what); put(" ret="); putsn(r);
	if (show_cpu) { put(" cpu="); putn(cpu); }
	put("\n");
	flush();
}

int lpc_main(int argc, char **argv)
{
	if (argc == 2 && argv[1][0] == 'b') {
		call("bug", 0xb06, 0);
		return 0;
	}
	if (argc == 2 && argv[1][0] == 's') {
		call("sleep", 0x5ee9, 0);
		return 0;
	}
	call("valid", 0, 1);
	call("null", 0, 0);
	call("unmapped", 0x1000, 0);
	call("warn", 0x1234, 0);
	put("getcpu_probe done\n");
	return 0;
}
