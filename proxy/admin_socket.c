/* admin_socket.c - the admin console's Unix socket: listening, peer levels, connections, lines.
 *
 * Protocol (as HAProxy's stats socket): one line of commands joined with ';'; every answer ends
 * with an empty line; the connection closes after the line unless `prompt` made it interactive.
 * `echo "show nodes" | socat - UNIX-CONNECT:/run/pgrelay/admin.sock` is the intended use. The
 * peer's level comes from its uid (SO_PEERCRED); admin_commands.c runs what it sends.
 */
#include "admin.h"
#include "admin_console.h"
#include "config.h"
#include "log.h"
#include "master.h"

#include <errno.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define ADMIN_IDLE_S     10   /* a connection that sends no line for this long is closed */
#define ADMIN_PROMPT_IDLE_S 600 /* the same in interactive (prompt) mode */
#define ADMIN_MAX_CONNS  64   /* connections served at once; more are answered an error,
                               * except for admin level (root can always get in) */
#define ADMIN_OUT_MAX    (1024 * 1024) /* answers a slow reader may leave unread before its
                                        * next lines wait (and the socket is not read) */

/* One accepted connection. */
typedef struct admin_conn {
    struct admin_conn *prev, *next;
    struct bufferevent *bev;
    uid_t uid;
    admin_session sess;  /* level and mode, changed by the commands it runs */
    struct event *ev_wait; /* `pause wait`: polls admin_wait_poll, NULL when not waiting */
} admin_conn;

static struct {
    master *m;
    int fd;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    struct event ev_accept;
    admin_conn *conns;
    int n_conns;         /* length of conns */
    bool full_logged;    /* the refusal at ADMIN_MAX_CONNS was logged since the last free */
} admin;

/* A peer that sends no line, or reads no answer, for this long is closed. */
static void admin_set_idle(admin_conn *c)
{
    struct timeval tv = {c->sess.interactive ? ADMIN_PROMPT_IDLE_S : ADMIN_IDLE_S, 0};
    bufferevent_set_timeouts(c->bev, &tv, &tv);
}

/* Run one line; `prompt` may have changed the mode, and with it the idle timeout. */
static void admin_conn_run_line(admin_conn *c, char *line, size_t len)
{
    bool was_interactive = c->sess.interactive;
    admin_run_line(admin.m, &c->sess, line, len, bufferevent_get_output(c->bev));
    if (c->sess.interactive != was_interactive)
        admin_set_idle(c);
}

/* ---- connections ---- */

static void admin_conn_free(admin_conn *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        admin.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    admin.n_conns--;
    admin.full_logged = false;
    if (c->ev_wait)
        event_free(c->ev_wait);
    bufferevent_free(c->bev);
    free(c);
}

#define ADMIN_WAIT_POLL_MS 20 /* how often `pause wait` looks at the sessions */

static void admin_conn_lines(admin_conn *c);

/* `pause wait` is done: go on as after any answered line. */
static void admin_on_wait(evutil_socket_t fd, short what, void *arg)
{
    admin_conn *c = arg;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    (void)fd;
    (void)what;
    if (!admin_wait_poll(admin.m, &c->sess, out))
        return;
    event_free(c->ev_wait);
    c->ev_wait = NULL;
    if (c->sess.interactive) {
        evbuffer_add_printf(out, "> ");
        admin_set_idle(c);
        admin_conn_lines(c); /* lines that came meanwhile, then reading again */
        return;
    }
    c->sess.closing = true;
    if (evbuffer_get_length(out) == 0)
        admin_conn_free(c);
}

/* The line left the session waiting: stop reading and poll until the answer is written. */
static bool admin_start_wait(admin_conn *c)
{
    struct timeval tv = {0, ADMIN_WAIT_POLL_MS * 1000};
    c->ev_wait = event_new(bufferevent_get_base(c->bev), -1, EV_PERSIST, admin_on_wait, c);
    if (!c->ev_wait || event_add(c->ev_wait, &tv) != 0) {
        log_error("admin socket: cannot start waiting for pause wait");
        c->sess.waiting = false;
        evbuffer_add_printf(bufferevent_get_output(c->bev), "error: cannot wait\n\n");
        return false;
    }
    bufferevent_disable(c->bev, EV_READ);
    bufferevent_set_timeouts(c->bev, NULL, NULL);
    return true;
}

/* Run the complete lines that have arrived, as long as the peer reads the answers: past
 * ADMIN_OUT_MAX unread, the rest waits, and the socket is not read, until the answers are
 * written (admin_on_write). May free c. */
static void admin_conn_lines(admin_conn *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    struct evbuffer *out = bufferevent_get_output(c->bev);
    char *line;
    size_t len;

    if (c->sess.closing)
        return;
    while (evbuffer_get_length(out) < ADMIN_OUT_MAX &&
           (line = evbuffer_readln(in, &len, EVBUFFER_EOL_CRLF)) != NULL) {
        if (len > ADMIN_LINE_MAX) {
            evbuffer_add_printf(out, "error: line longer than %d characters\n\n",
                                ADMIN_LINE_MAX);
        } else {
            admin_conn_run_line(c, line, len);
        }
        free(line);
        if (c->sess.waiting && admin_start_wait(c))
            return; /* admin_on_wait goes on */
        if (!c->sess.interactive)
            c->sess.closing = true;
        else
            evbuffer_add_printf(out, "> ");
        if (c->sess.closing)
            break;
    }
    bool has_line = evbuffer_search_eol(in, NULL, NULL, EVBUFFER_EOL_CRLF).pos >= 0;
    if (!c->sess.closing && !has_line && evbuffer_get_length(in) > ADMIN_LINE_MAX) {
        evbuffer_add_printf(out, "error: line longer than %d characters\n\n", ADMIN_LINE_MAX);
        c->sess.closing = true;
    }
    if (c->sess.closing && evbuffer_get_length(out) == 0) {
        admin_conn_free(c);
        return;
    }
    if (!c->sess.closing && has_line)
        bufferevent_disable(c->bev, EV_READ); /* answers first; admin_on_write resumes */
    else if (!c->sess.closing)
        bufferevent_enable(c->bev, EV_READ);
}

/* Everything written: close, or go on with lines held back for a slow reader. */
static void admin_on_write(struct bufferevent *bev, void *arg)
{
    admin_conn *c = arg;
    (void)bev;
    if (c->sess.closing)
        admin_conn_free(c);
    else
        admin_conn_lines(c);
}

static void admin_on_read(struct bufferevent *bev, void *arg)
{
    (void)bev;
    admin_conn_lines(arg);
}

static void admin_on_event(struct bufferevent *bev, short what, void *arg)
{
    admin_conn *c = arg;
    if (c->ev_wait && (what & BEV_EVENT_EOF))
        return; /* the client only closed its side: the answer still goes out */
    if (what & BEV_EVENT_EOF) {
        /* A last line without a newline still counts (printf "show info" | socat ...). */
        struct evbuffer *in = bufferevent_get_input(bev);
        size_t len = evbuffer_get_length(in);
        if (!c->sess.closing && c->sess.level == ADMIN_LEVEL_NONE) {
            char empty[] = "";
            admin_conn_run_line(c, empty, 0);
        } else if (!c->sess.closing && len > 0 && len <= ADMIN_LINE_MAX) {
            char *line = malloc(len + 1);
            if (line) {
                evbuffer_remove(in, line, len);
                line[len] = '\0';
                admin_conn_run_line(c, line, len);
                free(line);
            }
        }
        if (c->sess.waiting && admin_start_wait(c))
            return; /* admin_on_wait answers, then closes */
        c->sess.closing = true;
        if (evbuffer_get_length(bufferevent_get_output(bev)) > 0) {
            bufferevent_disable(bev, EV_READ);
            return; /* admin_on_write frees once flushed */
        }
    }
    admin_conn_free(c);
}

/* Is uid one of the comma-separated user names (or numeric uids) in list? */
static bool uid_in_list(uid_t uid, const char *list)
{
    char buf[512];
    char *save = NULL;
    snprintf(buf, sizeof(buf), "%s", list);
    for (char *name = strtok_r(buf, ", ", &save); name; name = strtok_r(NULL, ", ", &save)) {
        char *end;
        unsigned long n = strtoul(name, &end, 10);
        if (*end == '\0' && end != name) {
            if ((uid_t)n == uid)
                return true;
            continue;
        }
        struct passwd *pw = getpwnam(name);
        if (pw && pw->pw_uid == uid)
            return true;
    }
    return false;
}

static admin_level admin_level_of(uid_t uid)
{
    const config *cfg = admin.m->cfg;
    if (uid == 0 || uid == geteuid() || uid_in_list(uid, cfg->admin_users))
        return ADMIN_LEVEL_ADMIN;
    if (uid_in_list(uid, cfg->operator_users))
        return ADMIN_LEVEL_OPERATOR;
    if (uid_in_list(uid, cfg->stats_users))
        return ADMIN_LEVEL_USER;
    return ADMIN_LEVEL_NONE;
}

static void admin_on_accept(evutil_socket_t lfd, short what, void *arg)
{
    (void)what;
    (void)arg;
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno != EAGAIN && errno != EINTR)
            log_warning("admin socket: accept: %s", strerror(errno));
        return;
    }
    struct ucred cred;
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        log_warning("admin socket: cannot read the peer's credentials: %s", strerror(errno));
        close(fd);
        return;
    }
    admin_level level = admin_level_of(cred.uid);
    if (admin.n_conns >= ADMIN_MAX_CONNS && level != ADMIN_LEVEL_ADMIN) {
        static const char busy[] = "error: too many console connections; try again\n\n";
        if (!admin.full_logged)
            log_warning("admin socket: %d connections open; refusing more (uid %d, pid %d)",
                        admin.n_conns, (int)cred.uid, (int)cred.pid);
        admin.full_logged = true;
        if (send(fd, busy, sizeof(busy) - 1, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
            log_debug("admin socket: cannot tell uid %d it is refused: %s", (int)cred.uid,
                      strerror(errno));
        close(fd);
        return;
    }
    if (level == ADMIN_LEVEL_NONE)
        log_warning("admin socket: refused uid %d (pid %d)", (int)cred.uid, (int)cred.pid);
    admin_conn *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return;
    }
    c->uid = cred.uid;
    c->sess.level = level;
    c->bev = bufferevent_socket_new(admin.m->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (!c->bev) {
        close(fd);
        free(c);
        return;
    }
    c->next = admin.conns;
    if (admin.conns)
        admin.conns->prev = c;
    admin.conns = c;
    admin.n_conns++;
    bufferevent_setcb(c->bev, admin_on_read, admin_on_write, admin_on_event, c);
    admin_set_idle(c);
    bufferevent_enable(c->bev, EV_READ | EV_WRITE);
    log_debug("admin socket: uid %d connected with %s level", (int)cred.uid,
              admin_level_name(level));
}

/* ---- the socket ---- */

static int mkdir_parent(const char *path)
{
    char dir[sizeof(admin.path)];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        return 0;
    *slash = '\0';
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

int admin_start(master *m)
{
    const config *cfg = m->cfg;
    struct sockaddr_un sun = {.sun_family = AF_UNIX};

    admin.m = m;
    admin.fd = -1;
    if (cfg->admin_socket[0] == '\0')
        return 0;
    if (strlen(cfg->admin_socket) >= sizeof(sun.sun_path)) {
        log_error("admin_socket %s: path is too long", cfg->admin_socket);
        return -1;
    }
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", cfg->admin_socket);
    if (mkdir_parent(cfg->admin_socket) != 0) {
        log_error("admin_socket %s: cannot create its directory: %s", cfg->admin_socket,
                  strerror(errno));
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        log_error("admin_socket %s: socket: %s", cfg->admin_socket, strerror(errno));
        return -1;
    }
    /* A socket file left by a dead pgrelay is removed; a live one means another instance. */
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 && connect(probe, (struct sockaddr *)&sun, sizeof(sun)) == 0) {
        close(probe);
        close(fd);
        log_error("admin_socket %s is in use by another running pgrelay", cfg->admin_socket);
        return -1;
    }
    if (probe >= 0)
        close(probe);
    unlink(cfg->admin_socket);
    mode_t old_umask = umask(0177);
    int rc = bind(fd, (struct sockaddr *)&sun, sizeof(sun));
    umask(old_umask);
    if (rc != 0) {
        log_error("admin_socket %s: bind: %s", cfg->admin_socket, strerror(errno));
        close(fd);
        return -1;
    }
    if (cfg->admin_socket_group[0]) {
        struct group *gr = getgrnam(cfg->admin_socket_group);
        if (!gr || chown(cfg->admin_socket, (uid_t)-1, gr->gr_gid) != 0) {
            log_error("admin_socket %s: cannot give it to group %s: %s", cfg->admin_socket,
                      cfg->admin_socket_group, gr ? strerror(errno) : "no such group");
            close(fd);
            unlink(cfg->admin_socket);
            return -1;
        }
    }
    if (chmod(cfg->admin_socket, (mode_t)cfg->admin_socket_mode) != 0 || listen(fd, 64) != 0) {
        log_error("admin_socket %s: %s", cfg->admin_socket, strerror(errno));
        close(fd);
        unlink(cfg->admin_socket);
        return -1;
    }
    admin.fd = fd;
    snprintf(admin.path, sizeof(admin.path), "%s", cfg->admin_socket);
    event_assign(&admin.ev_accept, m->base, fd, EV_READ | EV_PERSIST, admin_on_accept, NULL);
    event_add(&admin.ev_accept, NULL);
    log_info("admin socket %s (mode %04o)", cfg->admin_socket, cfg->admin_socket_mode);
    return 0;
}

void admin_stop_listening(void)
{
    if (admin.fd < 0)
        return;
    event_del(&admin.ev_accept);
    close(admin.fd);
    admin.fd = -1;
    unlink(admin.path);
}

void admin_close_in_child(void)
{
    if (admin.fd >= 0)
        close(admin.fd);
    for (admin_conn *c = admin.conns; c; c = c->next)
        close(bufferevent_getfd(c->bev));
}
