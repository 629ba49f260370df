"""The seccomp allowlist: the Moby/Docker default profile, minus what stockade also refuses.

Everything not listed is refused with EPERM; syscalls of a foreign architecture (32-bit
``int 0x80`` on x86_64, for instance) kill the process. Compared with Moby's default (for a
container without extra capabilities) this profile additionally refuses io_uring,
name_to_handle_at and the mempolicy calls. ``TIOCSTI`` needs no filter: every step runs in a
new session without a controlling terminal. Rules with
argument conditions are in :data:`CONDITIONAL`; the lists are data, compiled to BPF by
``seccomp.py`` (bwrap) and rendered as the OCI runtime spec's ``linux.seccomp`` by
``oci_config.py`` (runc, runsc): one profile, two encodings.
"""

from __future__ import annotations

import errno
from typing import NamedTuple

_ALLOW_TEXT = """
accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown
clock_adjtime clock_getres clock_gettime clock_nanosleep close close_range connect
copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait
epoll_pwait2 epoll_wait eventfd eventfd2 execve execveat exit exit_group faccessat
faccessat2 fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchownat
fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstatfs fsync
ftruncate futex futex_requeue futex_wait futex_waitv futex_wake futimesat getcpu getcwd
getdents getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp
getpid getppid getpriority getrandom getresgid getresuid getrlimit get_robust_list getrusage
getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getxattr
inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel io_destroy
io_getevents io_pgetevents ioprio_get ioprio_set io_setup io_submit kill landlock_add_rule
landlock_create_ruleset landlock_restrict_self lchown lgetxattr link linkat listen listxattr
llistxattr lremovexattr lseek lsetxattr lstat madvise map_shadow_stack membarrier
memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap
mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink mremap
msgctl msgget msgrcv msgsnd msync munlock munlockall munmap nanosleep newfstatat open openat
openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll
ppoll prctl pread64 preadv preadv2 prlimit64 process_mrelease process_vm_readv
process_vm_writev pselect6 ptrace pwrite64 pwritev pwritev2 read readahead readlink readlinkat
readv recvfrom recvmmsg recvmsg remap_file_pages removexattr rename renameat renameat2
restart_syscall rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo sched_getaffinity sched_getattr
sched_getparam sched_get_priority_max sched_get_priority_min sched_getscheduler
sched_rr_get_interval sched_setaffinity sched_setattr sched_setparam sched_setscheduler
sched_yield seccomp select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto
setfsgid setfsuid setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid
setreuid setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid
setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 socketpair splice
stat statfs statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time
timer_create timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create
timerfd_gettime timerfd_settime times tkill truncate umask uname unlink unlinkat utime
utimensat utimes vfork vmsplice wait4 waitid write writev
arch_prctl
"""
ALLOW: tuple[str, ...] = tuple(_ALLOW_TEXT.split())

# Namespace flags a clone() may not carry (CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|
# NEWNET): a job cannot make namespaces, so it cannot get capabilities in a new user namespace.
CLONE_NS_FLAGS = 0x7E020000
AF_VSOCK = 40
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
REFUSED_ERRNO = errno.EPERM  # what every syscall not allowed returns


class Condition(NamedTuple):
    """A test of argument number ``arg``: ``op`` is libseccomp's (``EQ``, ``NE``,
    ``MASKED_EQ``: the argument masked with ``value`` equals ``value_two``)."""

    arg: int
    op: str
    value: int
    value_two: int = 0


class Rule(NamedTuple):
    """One rule with a condition or an errno of its own: allowed (``errno`` None) when
    ``condition`` holds (always, without one), else refused with ``errno``."""

    syscall: str
    condition: Condition | None = None
    errno: int | None = None


CONDITIONAL: tuple[Rule, ...] = (
    Rule("clone", Condition(0, "MASKED_EQ", CLONE_NS_FLAGS, 0)),
    Rule("clone3", errno=errno.ENOSYS),  # libc falls back to clone(), filtered above
    Rule("socket", Condition(0, "NE", AF_VSOCK)),
    *(Rule("personality", Condition(0, "EQ", value)) for value in PERSONALITY_ALLOWED),
    Rule("ioctl"),
)

# Refused on purpose, listed so that tests can check each one is really refused.
_REFUSED_TEXT = """
mount umount2 pivot_root chroot unshare setns clone3 add_key keyctl request_key bpf
perf_event_open userfaultfd open_by_handle_at name_to_handle_at io_uring_setup io_uring_enter
io_uring_register kexec_load kexec_file_load init_module finit_module delete_module acct
swapon swapoff reboot sethostname setdomainname settimeofday clock_settime quotactl syslog
vhangup iopl ioperm fsopen fsmount fsconfig fspick move_mount open_tree mount_setattr
lookup_dcookie fanotify_init kcmp pidfd_getfd process_madvise mbind set_mempolicy
get_mempolicy move_pages migrate_pages
"""
REFUSED: tuple[str, ...] = tuple(_REFUSED_TEXT.split())
