/* config_local.c - the configuration version this proxy claims, checked against its file:
 * PATH.version holds the version last applied through the control plane and a SHA-256 digest
 * of it with its text, so that a hand edit of PATH (or of PATH.version) is noticed.
 *
 * PATH.version is one line, "VERSION HEX": HEX is the SHA-256 of "pgrelay configuration
 * version VERSION\n" followed by the text, in lower-case hex (the version is inside the digest,
 * so a changed number is noticed too). The file PATH is hashed again whenever its inode, size
 * or modification time changes (config_local_check, from the reporter, once per metrics
 * report). While it matches, the proxy claims the version; when it does not, or PATH.version
 * has no valid digest (written by hand, or by a pgrelay before digests), it claims none
 * (config_version 0) and reports the version it diverged from: an operator decides, the
 * desired version is not forced over a local edit (pgrelay-agent(8)).
 */
#include "config_local.h"
#include "log.h"

#include <errno.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define CONFIG_LOCAL_SUFFIX   ".version"
#define CONFIG_LOCAL_PATH_MAX 1100
#define CONFIG_LOCAL_HEX_LEN  (2 * 32 + 1) /* SHA-256 in hex, NUL included */
#define CONFIG_LOCAL_LINE_MAX 128          /* PATH.version's one line */

static struct {
    pthread_mutex_t lock;
    int64_t version;                   /* the version recorded (0: none) */
    char digest[CONFIG_LOCAL_HEX_LEN]; /* its digest; "" when PATH.version had none */
    int64_t diverged;                  /* the version the file no longer matches (0: none) */
    char why[2 * CONFIG_LOCAL_PATH_MAX + 256]; /* what diverged, for the log */
    bool busy;                                 /* an apply is writing PATH: no check meanwhile */
    bool seen_valid;                           /* seen describes PATH as last hashed */
    struct stat seen;                          /* PATH's inode, size and times when last hashed */
} local = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* The digest of version with text into hex. 0, or -1 (OpenSSL failed). */
static int local_digest(int64_t version, const char *text, size_t len,
                        char hex[CONFIG_LOCAL_HEX_LEN])
{
    char head[64];
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    int n =
        snprintf(head, sizeof(head), "pgrelay configuration version %lld\n", (long long)version);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 &&
             EVP_DigestUpdate(ctx, head, (size_t)n) == 1 && EVP_DigestUpdate(ctx, text, len) == 1 &&
             EVP_DigestFinal_ex(ctx, md, &mdlen) == 1;
    EVP_MD_CTX_free(ctx);
    if (!ok || mdlen != 32)
        return -1;
    for (unsigned int i = 0; i < mdlen; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return 0;
}

/* A whole file (malloc'd, *len bytes), or NULL with errno set. */
static char *local_read(const char *path, size_t *len, struct stat *st)
{
    FILE *f = fopen(path, "re");
    char *text = NULL;
    if (!f)
        return NULL;
    if (fstat(fileno(f), st) == 0 && (text = malloc((size_t)st->st_size + 1)) != NULL) {
        *len = fread(text, 1, (size_t)st->st_size, f);
        text[*len] = '\0';
        if (ferror(f)) {
            free(text);
            text = NULL;
            errno = EIO;
        }
    }
    fclose(f);
    return text;
}

static bool local_same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
           a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

/* Hash path again and set local.diverged (lock held). Logs a change either way. */
static void local_compare(const char *path)
{
    char hex[CONFIG_LOCAL_HEX_LEN] = "";
    size_t len = 0;
    struct stat st;
    int64_t was = local.diverged;
    char *text = local_read(path, &len, &st);
    if (!text) {
        log_warning("control plane: cannot read %s to check it against configuration version "
                    "%lld: %s",
                    path, (long long)local.version, strerror(errno));
        local.seen_valid = false;
        return;
    }
    local.seen = st;
    local.seen_valid = true;
    if (!local.digest[0]) {
        local.diverged = local.version;
        snprintf(local.why, sizeof(local.why),
                 "%s" CONFIG_LOCAL_SUFFIX " has no digest "
                 "(written by hand, or by an older pgrelay)",
                 path);
    } else if (local_digest(local.version, text, len, hex) != 0 || strcmp(hex, local.digest)) {
        local.diverged = local.version;
        snprintf(local.why, sizeof(local.why),
                 "%s is not the text of version %lld as applied "
                 "(sha256 differs from %s" CONFIG_LOCAL_SUFFIX "): edited by hand?",
                 path, (long long)local.version, path);
    } else {
        local.diverged = 0;
    }
    free(text);
    if (local.diverged && !was)
        log_warning("control plane: %s; this proxy no longer claims configuration version %lld "
                    "and does not take the deployment's version by itself: restore the file "
                    "(pgrelayctl config show has the text) or apply a configuration "
                    "(pgrelayctl config apply)",
                    local.why, (long long)local.version);
    else if (!local.diverged && was)
        log_info("control plane: %s matches configuration version %lld again: claiming it", path,
                 (long long)local.version);
}

int64_t config_local_init(const char *path, int64_t kept)
{
    char vpath[CONFIG_LOCAL_PATH_MAX], line[CONFIG_LOCAL_LINE_MAX];
    snprintf(vpath, sizeof(vpath), "%s" CONFIG_LOCAL_SUFFIX, path);
    pthread_mutex_lock(&local.lock);
    FILE *f = fopen(vpath, "re");
    local.version = 0;
    local.digest[0] = '\0';
    if (f && fgets(line, sizeof(line), f)) {
        char *end, *hex;
        long long v = strtoll(line, &end, 10);
        if (v > 0 && end != line) {
            local.version = v;
            hex = end + strspn(end, " ");
            size_t n = strspn(hex, "0123456789abcdef");
            if (n == CONFIG_LOCAL_HEX_LEN - 1 && (hex[n] == '\n' || hex[n] == '\0'))
                snprintf(local.digest, sizeof(local.digest), "%.*s", (int)n, hex);
        }
    } else if (!f && errno != ENOENT) {
        log_warning("control plane: cannot read %s: %s", vpath, strerror(errno));
    }
    if (f)
        fclose(f);
    if (local.version == 0 && kept > 0) { /* the master kept a version its file does not name */
        local.version = kept;
        local.diverged = kept;
        snprintf(local.why, sizeof(local.why), "%s is missing or unreadable", vpath);
        log_warning("control plane: %s; this proxy no longer claims configuration version %lld",
                    local.why, (long long)kept);
    } else if (local.version > 0) {
        log_info("control plane: configuration version %lld (from %s)", (long long)local.version,
                 vpath);
        local_compare(path);
    }
    int64_t v = local.version;
    pthread_mutex_unlock(&local.lock);
    return v;
}

void config_local_check(const char *path)
{
    struct stat st;
    pthread_mutex_lock(&local.lock);
    if (local.version > 0 && !local.busy && local.digest[0] &&
        !(local.seen_valid && stat(path, &st) == 0 && local_same_file(&st, &local.seen)))
        local_compare(path);
    pthread_mutex_unlock(&local.lock);
}

void config_local_begin(void)
{
    pthread_mutex_lock(&local.lock);
    local.busy = true;
    pthread_mutex_unlock(&local.lock);
}

int config_local_end(const char *path, int64_t version, const char *text, char *line, size_t len)
{
    char hex[CONFIG_LOCAL_HEX_LEN];
    struct stat st;
    int rc = 1;
    pthread_mutex_lock(&local.lock);
    local.busy = false;
    local.seen_valid = stat(path, &st) == 0; /* this apply's own write is no local edit */
    if (local.seen_valid)
        local.seen = st;
    if (version <= 0 || !text)
        goto done;
    if (local_digest(version, text, strlen(text), hex) != 0) {
        log_error("control plane: cannot compute the SHA-256 of configuration version %lld "
                  "(OpenSSL): %s" CONFIG_LOCAL_SUFFIX " is not written",
                  (long long)version, path);
        rc = -1;
        goto done;
    }
    if (local.diverged)
        log_info("control plane: configuration version %lld replaces the local edit (%s)",
                 (long long)version, local.why);
    local.version = version;
    snprintf(local.digest, sizeof(local.digest), "%s", hex);
    local.diverged = 0;
    snprintf(line, len, "%lld %s\n", (long long)version, hex);
    rc = 0;
done:
    pthread_mutex_unlock(&local.lock);
    return rc;
}

int64_t config_local_claimed(void)
{
    pthread_mutex_lock(&local.lock);
    int64_t v = local.diverged ? 0 : local.version;
    pthread_mutex_unlock(&local.lock);
    return v;
}

int64_t config_local_diverged(void)
{
    pthread_mutex_lock(&local.lock);
    int64_t v = local.diverged;
    pthread_mutex_unlock(&local.lock);
    return v;
}
