/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kpatch-syscall.h for lucos-build.
 *
 * kpatch-style patches change a system call by writing KPATCH_SYSCALL_DEFINEn(name, ...)
 * in place of SYSCALL_DEFINEn. kpatch needs that because SYSCALL_DEFINE also emits the
 * syscall's trace metadata (__syscalls_metadata, _ftrace_events) and an error-injection
 * entry, which its tool cannot carry into a patch, and because __do_sys_NAME is an inline
 * (notrace) function.
 *
 * lucos-build needs neither: it takes from the patched object only what the changed
 * functions use, so the running kernel keeps its own trace metadata, and it patches the
 * wrapper __x64_sys_NAME (into which __do_sys_NAME is inlined) whether or not a function
 * has an ftrace entry. KPATCH_SYSCALL_DEFINEn is therefore the kernel's own syscall
 * definition without the metadata (its syscall tracepoints keep working: they are not in
 * the syscall's function).
 */
#ifndef __KPATCH_SYSCALL_H_
#define __KPATCH_SYSCALL_H_

#include <linux/syscalls.h>

#define KPATCH_SYSCALL_DEFINE1(name, ...) KPATCH_SYSCALL_DEFINEx(1, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE2(name, ...) KPATCH_SYSCALL_DEFINEx(2, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE3(name, ...) KPATCH_SYSCALL_DEFINEx(3, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE4(name, ...) KPATCH_SYSCALL_DEFINEx(4, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE5(name, ...) KPATCH_SYSCALL_DEFINEx(5, _##name, __VA_ARGS__)
#define KPATCH_SYSCALL_DEFINE6(name, ...) KPATCH_SYSCALL_DEFINEx(6, _##name, __VA_ARGS__)

/* The architecture's definition (arch/x86/include/asm/syscall_wrapper.h on x86-64). */
#define KPATCH_SYSCALL_DEFINEx(x, sname, ...) __SYSCALL_DEFINEx(x, sname, __VA_ARGS__)

#endif /* __KPATCH_SYSCALL_H_ */
