/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lucos patch module declarations.
 *
 * A lucos patch is a kernel module object built with the guest kernel's own kbuild, but
 * it is never insmod'ed: the lucos update server (outside the guest) reads the .ko,
 * links it against the running kernel's symbols (exported or not), copies it into guest
 * memory the VMM reserved, and redirects the old functions with a jmp at their entry.
 *
 * The records below go into .lucos.* sections the server reads. Names are stored inline
 * (no relocations needed to read them).
 */
#ifndef _LUCOS_H
#define _LUCOS_H

#include <linux/compiler.h>
#include <linux/types.h>

#define LUCOS_NAME_MAX 128
#define LUCOS_ABI_VERSION 1

struct lucos_replace {
	char old_name[LUCOS_NAME_MAX];	/* kernel function to replace */
	char new_name[LUCOS_NAME_MAX];	/* function in this module that replaces it */
	void *new_func;			/* keeps new_func alive; unused by the server */
};

struct lucos_info {
	u32 abi_version;
	char name[LUCOS_NAME_MAX];
	char description[256];
};

struct lucos_data {
	char name[LUCOS_NAME_MAX];	/* kernel global whose meaning changes */
	u64 mul;			/* new value = old value * mul / div */
	u64 div;
};

/* Replace kernel function `old` (by symbol name) with `new` from this module. */
#define LUCOS_REPLACE(old, new)							\
	static const struct lucos_replace __lucos_replace_##new			\
	__used __section(".lucos.replace") __aligned(8) = {			\
		.old_name = #old,						\
		.new_name = #new,						\
		.new_func = (void *)(new),					\
	}

/*
 * Data patch: the patched code keeps the integer kernel global `sym` (4 or 8 bytes) in new
 * units, new = old * mul / div. The update server (outside the guest) carries the state
 * over: when the jumps are installed it converts the current value and write-protects the
 * global's page; until the patch commits, every write to it from code outside this
 * module (old code still running) is converted the same way, writes from this module's
 * code are stored as they are. At commit the protection is dropped. Rollback converts
 * back (value * div / mul) and treats writes from this module's code, still running, the
 * same way until the rollback finishes.
 */
#define LUCOS_DATA_SCALE(sym, m, d)						\
	static const struct lucos_data __lucos_data_##sym			\
	__used __section(".lucos.data") __aligned(8) = {			\
		.name = #sym,							\
		.mul = (m),							\
		.div = (d),							\
	}

/* Name and describe the patch (once per module). */
#define LUCOS_PATCH(pname, pdesc)						\
	static const struct lucos_info __lucos_info				\
	__used __section(".lucos.info") __aligned(8) = {			\
		.abi_version = LUCOS_ABI_VERSION,				\
		.name = pname,							\
		.description = pdesc,						\
	}

#endif /* _LUCOS_H */
