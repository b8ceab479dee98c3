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

/* Replace kernel function `old` (by symbol name) with `new` from this module. */
#define LUCOS_REPLACE(old, new)							\
	static const struct lucos_replace __lucos_replace_##new			\
	__used __section(".lucos.replace") __aligned(8) = {			\
		.old_name = #old,						\
		.new_name = #new,						\
		.new_func = (void *)(new),					\
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
