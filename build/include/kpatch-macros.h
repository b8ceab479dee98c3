/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kpatch-macros.h for lucos-build: kpatch's patch-author macros, written for lucos.
 * (Callbacks: pending the callback ABI; see README "Live patches from source diffs".)
 */
#ifndef __KPATCH_MACROS_H_
#define __KPATCH_MACROS_H_

#include <linux/compiler.h>
#include <linux/jiffies.h>
#include "kpatch-syscall.h"

#endif /* __KPATCH_MACROS_H_ */
