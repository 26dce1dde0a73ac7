/*
 * kvmrkt guest init: what its parts share (limits, the pod config as parsed, the helpers every part uses).
 *
 * The guest init is PID 1 inside every pod VM; its parts: init.c (the boot sequence), util.c (messages,
 * escaping, status lines, directories and mounts), config.c (reading /kvmrkt/pod.cfg), devices.c (modules,
 * virtio disks and ports, dm-verity), network.c (the NICs), rootfs.c (each app's root, /dev and volumes),
 * apps.c (starting, confining, signalling and reaping the apps), agent.c (the sig and ctl ports: requests,
 * enter sessions, app 0's terminal), containers.c (containers created in the running VM: CREATE sessions),
 * template.c (a template VM's wait for its pod, and a clone's handoff). The protocol is documented in
 * docs/guest-protocol.md.
 *
 * Trust: the pod config and the host's requests come from stage0 and are trusted; the apps are hostile.
 * There are no shared globals: main (init.c) owns the parsed pod config and app 0's terminal relay and passes
 * them down; the status port lives in util.c (set once by main, status_set_fd).
 */
#ifndef KVMRKT_GUEST_INIT_H
#define KVMRKT_GUEST_INIT_H

#define _GNU_SOURCE
#include <limits.h>
#include <stddef.h>
#include <linux/filter.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/types.h>

#define MAX_APPS 32
#define MAX_VOLS 32
#define MAX_LIST 1024
#define MAX_NICS 8
#define MAX_ADDRS 8
#define MAX_ROUTES 32
#define MAX_FILES 16
#define MAX_PATHS 64
#define MAX_RLIMITS 16
#define MAX_SYSCTLS 64
#define MAX_DEVICES 32
#define POD_CONFIG_VERSION "6"
#define SHARED_DIR "/kvmrkt/shared"  /* the pod's shared export (9p), outside every app's root */

struct volume;
struct mountspec { char *vol; char *target; const struct volume *v; };  /* v: set by setup_app */

struct app {
    char *name;
    char *serial;           /* virtio-blk serial of the erofs image */
    char *verity_serial;    /* serial of its dm-verity hash tree (NULL: no verity) */
    char *verity_root;
    char *verity_salt;
    char *rootshare;        /* 9p tag of a host directory used as the root (NULL: erofs image) */
    int rootshare_ro;
    int rootbind;           /* a container (containers.c): rootshare is a directory in the shared export, bound */
    char *join;             /* a container: the app whose IPC and UTS namespaces it joins (NULL: its own) */
    char *shm;              /* a container: the app whose /dev/shm it binds (NULL: its own) */
    uid_t uid;
    gid_t gid;
    gid_t groups[64];
    int ngroups;
    char *cwd;
    char *argv[MAX_LIST];
    int argc;
    char *env[MAX_LIST];
    int envc;
    struct mountspec mounts[MAX_VOLS];
    int nmounts;
    unsigned long long caps;    /* capability bounding set */
    int capsets;                /* 1: set these four before exec (else: root keeps all, no inheritable/ambient) */
    unsigned long long cap_eff, cap_perm, cap_inh, cap_amb;
    struct sock_filter *filter; /* seccomp (NULL: none) */
    unsigned short filter_len;
    int nnp;
    char *masked[MAX_PATHS];
    int nmasked;
    char *ropaths[MAX_PATHS];
    int nro;
    struct { int resource; rlim_t soft, hard; } rlimits[MAX_RLIMITS];
    int nrlimits;
    struct { char *name, *value; } sysctls[MAX_SYSCTLS];  /* written in its namespaces by ns_init */
    int nsysctls;
    int oom_set, oom_score_adj;
    struct { char *path; char type; unsigned maj, min, mode, uid, gid; } devices[MAX_DEVICES];  /* in its /dev */
    int ndevices;
    int terminal;               /* runs on a terminal (app 0 of a tty pod): /dev/console is that terminal */
    char root[PATH_MAX];
    pid_t pid;
    int running;
    int exit_code;
};

struct volume { char *name; char *kind; char *tag; int ro; };

struct nic {
    char *name, *mac;
    int mtu;
    struct { char *ip; int prefix; } addrs[MAX_ADDRS];
    int naddrs;
    struct { char *dst; int prefix; char *gw; } routes[MAX_ROUTES];  /* gw NULL: on-link */
    int nroutes;
};

struct file { char *path, *content; };

/* The pod config as parse_config read it (written there only), plus each app's run state (apps.c). */
struct pod {
    struct app apps[MAX_APPS];
    int napps;
    struct volume vols[MAX_VOLS];
    int nvols;
    struct nic nics[MAX_NICS];
    int nnics;
    struct file files[MAX_FILES];
    int nfiles;
    char *hostname;
    char *shared;           /* 9p tag of the pod's shared export (NULL: none); "bind"/"rbind" volumes live there */
    int interactive;
    int hold;
    int tty;
};

/*
 * App 0's stdin port and terminal: `in` is opened by main at boot (so host input is queued, not dropped);
 * start_app sets `master` (app 0's terminal) and `out` (the port its output goes to); the agent relays between
 * them, closes them when app 0 is gone, and sets `size` ("WINSZ").
 */
struct tty_relay {
    int in;
    int master;
    int out;
    struct winsize size;
};

/* util.c */
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void write_all(int fd, const char *buf, size_t len);
void escape(const char *in, char *out, size_t outlen);
const char *visible(const char *in, char *out, size_t outlen);
void status_set_fd(int fd);
void status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void app_error(struct app *a, const char *what);
const char *app_last_error(void);
int hexval(char c);
int split(char *line, char **fields, int max);
int mkdirs(const char *path, mode_t mode);
int mount_at(const char *src, const char *dir, const char *type, unsigned long flags, const char *data);

/* template.c */
int template_mode(void);
int template_handoff(void);  /* the ctl port, open; -1: failed */
/* config.c */
int parse_config(const char *path, struct pod *pod);

/* devices.c */
void load_modules(void);
int find_device(const char *dir, const char *prefix, const char *attr, const char *want, char *out, size_t outlen);
int open_port(const char *name, int flags);
int find_disk(const char *serial, char *out, size_t outlen);
int open_verity(struct app *a, const char *data_dev, char *out, size_t outlen);

/* network.c */
int setup_network(struct nic *nics, int nnics);

#define CTR_DIR "/kvmrkt/ctr"      /* containers' roots in their CREATE helpers' mount namespaces */
#define CTR_RUN "/kvmrkt/run"      /* the running containers' registry, in the VM's root tmpfs */

/* rootfs.c */
int setup_volumes(const struct pod *pod);
int setup_app(const struct pod *pod, struct app *a);
int mount_volumes(struct app *a, char *why, size_t len);

/* apps.c */
void exec_app(struct app *a, char **argv, int in, int out, int err) __attribute__((noreturn));
void ns_init(struct app *a, const char *hostname, int in, int out, int err) __attribute__((noreturn));
int open_terminal(struct app *a, int *peer);
void start_app(struct pod *pod, int idx, struct tty_relay *relay);
struct app *app_named(struct pod *pod, const char *name);
void signal_apps(struct pod *pod, int sig);
int apps_running(const struct pod *pod);
void reap(struct pod *pod, void (*other)(pid_t pid, void *ctx), void *ctx);  /* other: a child not an app */

/* containers.c */
int ctr_name_ok(const char *name);
void create_session(struct pod *pod, int ctl, int sp, unsigned long long sid, char **fields, int n)
    __attribute__((noreturn));
struct app *container_named(const char *name, pid_t *pid);
void container_gone(const char *name, pid_t helper);

/* agent.c */
void supervise(struct pod *pod, struct tty_relay *relay, int ctl, int sig);
int wait_for_go(struct tty_relay *relay, int sig);
struct session_input;
struct session_input *session_input_new(void);
void session_frame(struct session_input *si, char *msg, size_t len, int in, int tty, pid_t target);
int session_hup(const struct session_input *si);
int session_relay(int ctl, int sp, unsigned long long sid, struct session_input *si, int out, int err, int in,
                  int tty, pid_t target, pid_t child);
void send_line(int ctl, unsigned long long sid, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
