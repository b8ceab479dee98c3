/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kpatch-macros.h for lucos-build: kpatch's patch-author macros, written for lucos, so that
 * kpatch-style patches build unmodified. lucos-build puts this header (with lucos.h and
 * kpatch-syscall.h) last on the include path of the patched build.
 *
 * Callbacks map onto lucos callbacks (lucos.h), which the update server runs from outside
 * the guest at a safe point, like a hard-interrupt handler (they must not sleep):
 *   KPATCH_PRE_PATCH_CALLBACK(fn)     int fn(patch_object *)  LUCOS_CB_PRE_APPLY: non-zero
 *                                                             refuses the patch
 *   KPATCH_POST_PATCH_CALLBACK(fn)    void fn(patch_object *) LUCOS_CB_APPLY
 *   KPATCH_PRE_UNPATCH_CALLBACK(fn)   void fn(patch_object *) LUCOS_CB_PRE_REVERT
 *   KPATCH_POST_UNPATCH_CALLBACK(fn)  void fn(patch_object *) LUCOS_CB_REVERT
 * A callback belongs to the object of the file it is in: the module the file is built
 * into (KBUILD_MODNAME), or vmlinux. obj->mod is that module's struct module (NULL for
 * vmlinux) and obj->name its name; a patch whose callbacks belong to a module applies only
 * while the module is loaded (lucos refuses patches to modules that are not).
 *   KPATCH_LOAD_HOOK(fn), KPATCH_UNLOAD_HOOK(fn)   void fn(void): kpatch's older hooks,
 *                                                  run as post-patch and pre-unpatch
 *   KPATCH_IGNORE_FUNCTION(fn)   lucos-build leaves fn out even if it changed
 *   KPATCH_IGNORE_SECTION(name)  lucos-build ignores changes in that section
 * Refused with a build error, because lucos cannot honour them:
 *   KPATCH_FORCE_UNSAFE(fn)      lucos never skips its commit check (stack inspection)
 *   KPATCH_IGNORE_STATIC(name)   lucos-build pairs static locals by their users
 */
#ifndef __KPATCH_MACROS_H_
#define __KPATCH_MACROS_H_

#include <linux/compiler.h>
#include <linux/jiffies.h>
#include <linux/types.h>
#include "lucos.h"
#include "kpatch-syscall.h"

struct module;

/* What a kpatch callback is told about its object. */
typedef struct kpatch_object {
	const char *name;	/* the module's name, or NULL for vmlinux */
	struct module *mod;	/* the module, or NULL for vmlinux */
	bool patched;
} patch_object;

#ifdef MODULE
#define __KPATCH_OBJECT KBUILD_MODNAME
#define __KPATCH_OBJECT_NAME KBUILD_MODNAME
#else
#define __KPATCH_OBJECT ""
#define __KPATCH_OBJECT_NAME NULL
#endif

#define __KPATCH_CALL(_fn, _patched, _ret)					\
	({									\
		patch_object __kpatch_obj = {					\
			.name = __KPATCH_OBJECT_NAME,				\
			.mod = (struct module *)a0,				\
			.patched = (_patched),					\
		};								\
		_ret;								\
	})

#define KPATCH_PRE_PATCH_CALLBACK(_fn)						\
	static inline int (*__kpatch_pre_patch_type_##_fn(void))(patch_object *) { return _fn; } \
	__LUCOS_CALLBACK_AS(LUCOS_CB_PRE_APPLY, __KPATCH_OBJECT, _fn,		\
			    __kpatch_pre_patch_##_fn, 0,			\
			    __KPATCH_CALL(_fn, false, _fn(&__kpatch_obj)))

#define KPATCH_POST_PATCH_CALLBACK(_fn)						\
	static inline void (*__kpatch_post_patch_type_##_fn(void))(patch_object *) { return _fn; } \
	__LUCOS_CALLBACK_AS(LUCOS_CB_APPLY, __KPATCH_OBJECT, _fn,		\
			    __kpatch_post_patch_##_fn, 0,			\
			    __KPATCH_CALL(_fn, true, (_fn(&__kpatch_obj), 0)))

#define KPATCH_PRE_UNPATCH_CALLBACK(_fn)					\
	static inline void (*__kpatch_pre_unpatch_type_##_fn(void))(patch_object *) { return _fn; } \
	__LUCOS_CALLBACK_AS(LUCOS_CB_PRE_REVERT, __KPATCH_OBJECT, _fn,		\
			    __kpatch_pre_unpatch_##_fn, 0,			\
			    __KPATCH_CALL(_fn, true, (_fn(&__kpatch_obj), 0)))

#define KPATCH_POST_UNPATCH_CALLBACK(_fn)					\
	static inline void (*__kpatch_post_unpatch_type_##_fn(void))(patch_object *) { return _fn; } \
	__LUCOS_CALLBACK_AS(LUCOS_CB_REVERT, __KPATCH_OBJECT, _fn,		\
			    __kpatch_post_unpatch_##_fn, 0,			\
			    __KPATCH_CALL(_fn, false, (_fn(&__kpatch_obj), 0)))

#define KPATCH_LOAD_HOOK(_fn)							\
	static inline void (*__kpatch_load_type_##_fn(void))(void) { return _fn; } \
	__LUCOS_CALLBACK_AS(LUCOS_CB_APPLY, __KPATCH_OBJECT, _fn,		\
			    __kpatch_load_##_fn, 0, (_fn(), 0))

#define KPATCH_UNLOAD_HOOK(_fn)							\
	static inline void (*__kpatch_unload_type_##_fn(void))(void) { return _fn; } \
	__LUCOS_CALLBACK_AS(LUCOS_CB_PRE_REVERT, __KPATCH_OBJECT, _fn,		\
			    __kpatch_unload_##_fn, 0, (_fn(), 0))

/* lucos-build reads these sections of the patched objects and leaves them out. */
#define KPATCH_IGNORE_SECTION(_sec)						\
	static const char *__UNIQUE_ID(kpatch_ignore_section_) __used		\
	__section(".kpatch.ignore.sections") = _sec;

#define KPATCH_IGNORE_FUNCTION(_fn)						\
	static void *__kpatch_ignore_func_##_fn __used				\
	__section(".kpatch.ignore.functions") = (void *)_fn;

#define KPATCH_FORCE_UNSAFE(_fn)						\
	_Static_assert(0, "KPATCH_FORCE_UNSAFE(" #_fn "): lucos never skips its commit " \
		       "check; a patch commits once no thread runs the old code")

#define KPATCH_IGNORE_STATIC(_static)						\
	_Static_assert(0, "KPATCH_IGNORE_STATIC(" _static "): lucos-build pairs static " \
		       "locals by the functions using them and cannot ignore one")

#endif /* __KPATCH_MACROS_H_ */
