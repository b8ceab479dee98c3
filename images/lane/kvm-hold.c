/*
 * kvm-hold: keep one idle VM open in the lane's L1 kernel for as long as the lane runs.
 *
 * KVM flips static keys in the L1 kernel's text when the first VM is created and the last
 * one destroyed (preempt notifiers, the local-APIC enable/disable keys). Under QEMU 7.2's
 * multi-threaded TCG, that cross-CPU code modification now and then wedges L1 for good
 * (about one in 45 guest boots; README "Lanes"). A VM that lives for the whole lane keeps
 * those keys enabled, so lucos-vmm's own VMs never flip them.
 *
 * The VM has an in-kernel irqchip and one vCPU that never runs. Written for the lane's
 * L1 initramfs; built static by images/lane/build-image.sh.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		perror("kvm-hold: /dev/kvm");
		return 1;
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) {
		perror("kvm-hold: KVM_CREATE_VM");
		return 1;
	}
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) {
		perror("kvm-hold: KVM_CREATE_IRQCHIP");
		return 1;
	}
	if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0) {
		perror("kvm-hold: KVM_CREATE_VCPU");
		return 1;
	}
	printf("kvm-hold: holding one idle VM\n");
	fflush(stdout);
	for (;;)
		pause();
}
