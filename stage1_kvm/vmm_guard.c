/*
 * kvmrkt-vmm-guard: runs a pod's VMM (QEMU) under a seccomp filter of kvmrkt's own, then executes it.
 *
 * Usage: kvmrkt-vmm-guard PROGRAM ARGV0 [ARGS...]   (executes PROGRAM with the argv ARGV0 ARGS...)
 * That is also what the kernel passes the interpreter of a "#!GUARD PROGRAM" script, so such a script can stand
 * in for QEMU where another program (libvirtd) starts it.
 *
 * Role: the VMM runs as the pod's unprivileged uid and serves the pod's shared directories over 9p
 * (security_model=none: host symlinks work, new files are the uid's). Nothing it does may leave a privileged file
 * on the host, even if the guest takes QEMU over (under TCG QEMU is not a security boundary). The filter refuses
 * (EPERM) every mode change or file creation that asks for set-uid or set-gid bits (chmod, fchmod, fchmodat,
 * open, openat, creat, mknod, mknodat) and every device node (mknod, mknodat); it makes unavailable (ENOSYS)
 * openat2 and io_uring, whose modes it cannot inspect, and every call newer than the guest kernel's table
 * (fchmodat2 and later), so a newer host kernel opens no way around it; another architecture's calls kill the
 * process. no_new_privs is set first (the filter needs it, and it stays); QEMU's own -sandbox filter stacks on
 * top of this one.
 *
 * Trust boundary: started by kvmrkt (or libvirtd on its behalf) with trusted arguments; what runs after it is not
 * trusted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#define LAST_KNOWN_SYSCALL 450 /* set_mempolicy_home_node: the end of Linux 6.1's x86_64 table */
#define ARG(n) (offsetof(struct seccomp_data, args) + 8 * (n))  /* low 32 bits (little endian) */
#define SETID (S_ISUID | S_ISGID)
#define DENY (SECCOMP_RET_ERRNO | EPERM)

static struct sock_filter prog[128];
static unsigned short len;

static void emit(struct sock_filter ins)
{
    prog[len++] = ins;
}

/* nr with its mode in argument `arg`: EPERM when it asks for set-id bits. */
static void mode_call(int nr, int arg)
{
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 4));
    emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG(arg)));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, SETID, 0, 1));
    emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, DENY));
    emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
}

/* mknod/mknodat with its mode in argument `arg`: EPERM for set-id bits and for character or block devices. */
static void node_call(int nr, int arg)
{
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 7));
    emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG(arg)));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, SETID, 4, 0));
    emit((struct sock_filter)BPF_STMT(BPF_ALU | BPF_AND | BPF_K, S_IFMT));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, S_IFCHR, 2, 0));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, S_IFBLK, 1, 0));
    emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, DENY));
}

static void unavailable(int nr)
{
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, 1));
    emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS));
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s PROGRAM ARGV0 [ARGS...]\n", argv[0]);
        return 2;
    }
    emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0));
    emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    emit((struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
    emit((struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, LAST_KNOWN_SYSCALL, 0, 1));
    emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS));
    unavailable(SYS_openat2);
    unavailable(SYS_io_uring_setup);
    unavailable(SYS_io_uring_enter);
    unavailable(SYS_io_uring_register);
    mode_call(SYS_chmod, 1);
    mode_call(SYS_fchmod, 1);
    mode_call(SYS_creat, 1);
    mode_call(SYS_fchmodat, 2);
    mode_call(SYS_open, 2);
    mode_call(SYS_openat, 3);
    node_call(SYS_mknod, 1);
    node_call(SYS_mknodat, 2);
    emit((struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));

    struct sock_fprog fprog = {len, prog};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog) < 0) {
        fprintf(stderr, "kvmrkt-vmm-guard: cannot install the seccomp filter: %s\n", strerror(errno));
        return 126;
    }
    execv(argv[1], argv + 2);
    fprintf(stderr, "kvmrkt-vmm-guard: cannot execute %s: %s\n", argv[1], strerror(errno));
    return errno == ENOENT ? 127 : 126;
}
