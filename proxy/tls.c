/* tls.c - TLS toward clients and nodes: the OpenSSL contexts (built at start and at every
 * reload), the non-blocking handshakes, and reads and writes on a session's TLS side.
 *
 * The master reads the certificate, key and CA files once and builds the contexts from their
 * bytes before it forks, so that a missing or broken file stops `pgrelay -t`, the start, or a
 * reload (which then keeps the running configuration); workers inherit the contexts, and at a
 * reload build theirs again from the very bytes the master checked (passed in shared memory),
 * so that a renewed certificate serves new sessions while running ones keep theirs, and a file
 * changed again after the reload changes nothing until the next one.
 */
#include "tls.h"
#include "log.h"
#include "tls_files.h"
#include "pgproto.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

/* ALPN protocol of PostgreSQL 17's direct TLS, in the wire format (length-prefixed). */
static const unsigned char tls_alpn_postgresql[] = {10, 'p', 'o', 's', 't', 'g', 'r', 'e',
                                                    's', 'q', 'l'};

static SSL_CTX *tls_client_current; /* new sessions take this one; NULL = TLS off */
static SSL_CTX *tls_server_current; /* new connections to nodes take this one; NULL = none */

SSL_CTX *tls_client_ctx(void)
{
    return tls_client_current;
}

SSL_CTX *tls_server_ctx(void)
{
    return tls_server_current;
}

/* "secure", "all", or tlsv1.0 ... tlsv1.3 separated by commas, colons or spaces: the lowest and
 * highest version named. Returns 0, or -1 naming the word it does not know. */
static int tls_parse_protocols(const char *text, int *min_out, int *max_out, char *err,
                               size_t err_len)
{
    static const struct {
        const char *word;
        int min, max;
    } words[] = {
        {"secure", TLS1_2_VERSION, TLS1_3_VERSION}, {"all", TLS1_VERSION, TLS1_3_VERSION},
        {"tlsv1.0", TLS1_VERSION, TLS1_VERSION},     {"tlsv1.1", TLS1_1_VERSION, TLS1_1_VERSION},
        {"tlsv1.2", TLS1_2_VERSION, TLS1_2_VERSION}, {"tlsv1.3", TLS1_3_VERSION, TLS1_3_VERSION},
    };
    int lo = 0, hi = 0;
    const char *p = text;
    while (*p) {
        size_t n = strcspn(p, ", :");
        if (n > 0) {
            size_t i;
            for (i = 0; i < sizeof(words) / sizeof(words[0]); i++)
                if (strlen(words[i].word) == n && strncasecmp(p, words[i].word, n) == 0)
                    break;
            if (i == sizeof(words) / sizeof(words[0])) {
                snprintf(err, err_len, "client_tls_protocols: unknown protocol \"%.*s\" (known: "
                         "secure, all, tlsv1.0, tlsv1.1, tlsv1.2, tlsv1.3)", (int)n, p);
                return -1;
            }
            if (!lo || words[i].min < lo)
                lo = words[i].min;
            if (words[i].max > hi)
                hi = words[i].max;
        }
        p += n;
        if (*p)
            p++;
    }
    if (!lo) {
        snprintf(err, err_len, "client_tls_protocols: no protocol named");
        return -1;
    }
    *min_out = lo;
    *max_out = hi;
    return 0;
}

/* A client that offers ALPN must offer "postgresql" (as PostgreSQL 17 answers); one that
 * offers none goes on (a client of an older libpq after SSLRequest). */
static int tls_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                           const unsigned char *in, unsigned int inlen, void *arg)
{
    (void)ssl;
    (void)arg;
    unsigned char *sel = NULL;
    if (SSL_select_next_proto(&sel, outlen, tls_alpn_postgresql, sizeof(tls_alpn_postgresql),
                              in, inlen) == OPENSSL_NPN_NEGOTIATED) {
        *out = sel;
        return SSL_TLSEXT_ERR_OK;
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL; /* no_application_protocol */
}

/* The files a configuration may name, in the order of shm_tls_files. */
enum {
    TLS_FILE_CLIENT_CERT,
    TLS_FILE_CLIENT_KEY,
    TLS_FILE_CLIENT_CA,
    TLS_FILE_SERVER_CA,
    TLS_FILE_SERVER_CERT,
    TLS_FILE_SERVER_KEY,
};
_Static_assert(TLS_FILE_SERVER_KEY + 1 == SHM_TLS_FILES, "one length per file");

static const char *const tls_file_keys[SHM_TLS_FILES] = {
    "client_tls_cert_file", "client_tls_key_file",  "client_tls_ca_file",
    "server_tls_ca_file",   "server_tls_cert_file", "server_tls_key_file"};

static const char *tls_file_path(const config *cfg, int i)
{
    switch (i) {
    case TLS_FILE_CLIENT_CERT: return cfg->client_tls_cert_file;
    case TLS_FILE_CLIENT_KEY: return cfg->client_tls_key_file;
    case TLS_FILE_CLIENT_CA: return cfg->client_tls_ca_file;
    case TLS_FILE_SERVER_CA: return cfg->server_tls_ca_file;
    case TLS_FILE_SERVER_CERT: return cfg->server_tls_cert_file;
    default: return cfg->server_tls_key_file;
    }
}

/* Is any node spoken to over TLS? */
static bool tls_toward_nodes(const config *cfg)
{
    if (cfg->server_tls_mode != SERVER_TLS_DISABLE)
        return true;
    for (int i = 0; i < cfg->n_nodes; i++)
        if (config_node_server_tls(cfg, &cfg->nodes[i]) != SERVER_TLS_DISABLE)
            return true;
    return false;
}

/* Does cfg use file i? */
static bool tls_file_used(const config *cfg, int i)
{
    switch (i) {
    case TLS_FILE_CLIENT_CERT:
    case TLS_FILE_CLIENT_KEY: return cfg->client_tls_mode != CLIENT_TLS_DISABLE;
    case TLS_FILE_CLIENT_CA: return cfg->client_tls_mode >= CLIENT_TLS_VERIFY_CA;
    case TLS_FILE_SERVER_CA:
        return tls_toward_nodes(cfg) && cfg->server_tls_ca_file[0];
    default: return tls_toward_nodes(cfg) && cfg->server_tls_cert_file[0];
    }
}

/* File i of files, as tls_files' functions take it. */
static tls_pem tls_file_pem(const config *cfg, const shm_tls_files *files, int i)
{
    size_t at = 0;
    for (int j = 0; j < i; j++)
        at += files->len[j];
    return (tls_pem){.key = tls_file_keys[i], .file = tls_file_path(cfg, i),
                     .data = files->data + at, .len = files->len[i]};
}

/* Read the files cfg uses into files (the others get length 0). 0, or -1 with err filled. */
static int tls_files_read(const config *cfg, shm_tls_files *files, char *err, size_t err_len)
{
    size_t used = 0;
    for (int i = 0; i < SHM_TLS_FILES; i++) {
        files->len[i] = 0;
        if (!tls_file_used(cfg, i))
            continue;
        const char *path = tls_file_path(cfg, i);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            snprintf(err, err_len, "%s %s: %s", tls_file_keys[i], path, strerror(errno));
            return -1;
        }
        ssize_t n;
        size_t got = 0;
        do { /* to the end of the file, or of the room left */
            n = read(fd, files->data + used + got, SHM_TLS_BYTES - used - got);
            if (n > 0)
                got += (size_t)n;
        } while ((n > 0 || (n < 0 && errno == EINTR)) && used + got < SHM_TLS_BYTES);
        bool too_big = false;
        if (n >= 0 && used + got == SHM_TLS_BYTES) { /* the room is full: is there more? */
            char more;
            do
                n = read(fd, &more, 1);
            while (n < 0 && errno == EINTR);
            too_big = n > 0;
        }
        int failed = n < 0 ? errno : 0;
        close(fd);
        if (failed) {
            snprintf(err, err_len, "%s %s: %s", tls_file_keys[i], path, strerror(failed));
            return -1;
        }
        if (too_big) {
            snprintf(err, err_len, "%s %s: the certificate, key and CA files together are "
                     "larger than the %u MiB pgrelay reads", tls_file_keys[i], path,
                     SHM_TLS_BYTES >> 20);
            return -1;
        }
        files->len[i] = (uint32_t)got;
        used += got;
    }
    return 0;
}

shm_tls_files *tls_load(const config *cfg, char *err, size_t err_len)
{
    shm_tls_files *files = malloc(sizeof(*files)); /* pages used only as written */
    if (!files) {
        snprintf(err, err_len, "out of memory");
        return NULL;
    }
    if (tls_files_read(cfg, files, err, err_len) != 0 ||
        tls_setup(cfg, files, err, err_len) != 0) {
        free(files);
        return NULL;
    }
    return files;
}

static SSL_CTX *tls_client_build(const config *cfg, const shm_tls_files *files, char *err,
                                 size_t err_len)
{
    char why[256];
    int min = 0, max = 0;
    if (tls_parse_protocols(cfg->client_tls_protocols, &min, &max, err, err_len) != 0)
        return NULL;
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "cannot create a TLS context: %s", why);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, min);
    SSL_CTX_set_max_proto_version(ctx, max);
    /* No renegotiation: a write never has to wait for a read. Unexpected EOF (a client that
     * closes without close_notify, as libpq does) reads as an EOF. Kernel TLS where the kernel
     * and the cipher allow it. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                 SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_ENABLE_KTLS);
    /* The relay keeps what SSL_write did not take in its pending buffer and retries from
     * there: another address, and records written one at a time. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    if (strcasecmp(cfg->client_tls_ciphers, "default") != 0 &&
        SSL_CTX_set_cipher_list(ctx, cfg->client_tls_ciphers) != 1) {
        tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "client_tls_ciphers \"%s\": %s", cfg->client_tls_ciphers, why);
        goto failed;
    }
    tls_pem cert = tls_file_pem(cfg, files, TLS_FILE_CLIENT_CERT);
    tls_pem key = tls_file_pem(cfg, files, TLS_FILE_CLIENT_KEY);
    tls_pem ca = tls_file_pem(cfg, files, TLS_FILE_CLIENT_CA);
    if (tls_pem_use_cert_and_key(ctx, &cert, &key, err, err_len) != 0)
        goto failed;
    if (cfg->client_tls_mode >= CLIENT_TLS_VERIFY_CA &&
        tls_pem_require_client_certs(ctx, &ca, err, err_len) != 0)
        goto failed;
    SSL_CTX_set_alpn_select_cb(ctx, tls_alpn_select, NULL);
    return ctx;
failed:
    SSL_CTX_free(ctx);
    return NULL;
}

/* The context toward nodes: the client certificate and the CAs; whether a node's certificate
 * is checked is set per connection (server_tls_mode may differ per node). */
static SSL_CTX *tls_server_build(const config *cfg, const shm_tls_files *files, char *err,
                                 size_t err_len)
{
    char why[256];
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "cannot create a TLS context: %s", why);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF |
                                 SSL_OP_ENABLE_KTLS);
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_RELEASE_BUFFERS);
    tls_pem ca = tls_file_pem(cfg, files, TLS_FILE_SERVER_CA);
    tls_pem cert = tls_file_pem(cfg, files, TLS_FILE_SERVER_CERT);
    tls_pem key = tls_file_pem(cfg, files, TLS_FILE_SERVER_KEY);
    if (cfg->server_tls_ca_file[0] && tls_pem_load_ca(ctx, &ca, err, err_len) != 0)
        goto failed;
    if (cfg->server_tls_cert_file[0] &&
        tls_pem_use_cert_and_key(ctx, &cert, &key, err, err_len) != 0)
        goto failed;
    return ctx;
failed:
    SSL_CTX_free(ctx);
    return NULL;
}

int tls_setup(const config *cfg, const shm_tls_files *files, char *err, size_t err_len)
{
    SSL_CTX *client = NULL, *server = NULL;
    if (cfg->client_tls_mode != CLIENT_TLS_DISABLE) {
        client = tls_client_build(cfg, files, err, err_len);
        if (!client)
            return -1;
    }
    if (tls_toward_nodes(cfg)) {
        server = tls_server_build(cfg, files, err, err_len);
        if (!server) {
            SSL_CTX_free(client);
            return -1;
        }
    }
    /* Sessions hold their own references to the contexts they use. */
    SSL_CTX_free(tls_client_current);
    tls_client_current = client;
    SSL_CTX_free(tls_server_current);
    tls_server_current = server;
    return 0;
}

int tls_accept_begin(tls_conn *t, int fd)
{
    t->ssl = SSL_new(tls_client_current);
    if (!t->ssl || SSL_set_fd(t->ssl, fd) != 1) {
        SSL_free(t->ssl);
        t->ssl = NULL;
        ERR_clear_error();
        return -1;
    }
    SSL_set_accept_state(t->ssl);
    t->read_wants = EV_READ;
    t->write_wants = 0;
    t->handshaken = false;
    return 0;
}

int tls_connect_begin(tls_conn *t, int fd, const char *host, int mode)
{
    unsigned char addr[sizeof(struct in6_addr)];
    bool is_ip = inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1;
    t->ssl = tls_server_current ? SSL_new(tls_server_current) : NULL;
    if (!t->ssl || SSL_set_fd(t->ssl, fd) != 1)
        goto failed;
    SSL_set_connect_state(t->ssl);
    /* SNI names a host, never an address (RFC 6066), as libpq does. */
    if (!is_ip && host[0] != '/' && SSL_set_tlsext_host_name(t->ssl, host) != 1)
        goto failed;
    if (mode >= SERVER_TLS_VERIFY_CA)
        SSL_set_verify(t->ssl, SSL_VERIFY_PEER, NULL);
    else
        SSL_set_verify(t->ssl, SSL_VERIFY_NONE, NULL);
    if (mode == SERVER_TLS_VERIFY_FULL) {
        int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(t->ssl), host)
                       : SSL_set1_host(t->ssl, host);
        if (ok != 1)
            goto failed;
    }
    t->read_wants = 0;
    t->write_wants = 0;
    t->handshaken = false;
    return 0;
failed:
    SSL_free(t->ssl);
    t->ssl = NULL;
    ERR_clear_error();
    return -1;
}

/* What a failed call means: the event to wait for (1), or a hard error (-1, why filled). */
static int tls_classify(tls_conn *t, int rc, short *wants, char *why, size_t why_len)
{
    int e = SSL_get_error(t->ssl, rc);
    switch (e) {
    case SSL_ERROR_WANT_READ:
        *wants = EV_READ;
        return 1;
    case SSL_ERROR_WANT_WRITE:
        *wants = EV_WRITE;
        return 1;
    case SSL_ERROR_ZERO_RETURN:
        snprintf(why, why_len, "the peer closed the TLS connection");
        return -1;
    case SSL_ERROR_SYSCALL:
        if (errno)
            snprintf(why, why_len, "%s", strerror(errno));
        else
            snprintf(why, why_len, "the peer closed the connection");
        ERR_clear_error();
        return -1;
    default:
        tls_error_text(why, why_len);
        return -1;
    }
}

int tls_handshake(tls_conn *t, char *why, size_t why_len)
{
    ERR_clear_error();
    errno = 0;
    int rc = SSL_do_handshake(t->ssl);
    if (rc == 1) {
        t->handshaken = true;
        t->read_wants = 0;
        t->write_wants = 0;
        return 1;
    }
    short wants = 0;
    if (tls_classify(t, rc, &wants, why, why_len) < 0) {
        /* OpenSSL says "certificate verify failed"; X509 says why. */
        long verify = SSL_get_verify_result(t->ssl);
        if (verify != X509_V_OK) {
            size_t used = strlen(why);
            snprintf(why + used, why_len - used, " (%s)", X509_verify_cert_error_string(verify));
        }
        return -1;
    }
    t->read_wants = wants;
    return 0;
}

void tls_close(tls_conn *t)
{
    if (!t->ssl)
        return;
    if (t->handshaken) {
        /* One try, never waited for: the socket is closed right after. */
        SSL_shutdown(t->ssl);
    }
    ERR_clear_error();
    SSL_free(t->ssl);
    t->ssl = NULL;
}

ssize_t tls_read(tls_conn *t, void *buf, size_t len)
{
    size_t got = 0;
    char why[256];
    ERR_clear_error();
    /* One record per SSL_read: fill the buffer as one recv() would, so the scanner and the
     * write to the other side run once per buffer, not once per 16 kB record. */
    while (got < len) {
        size_t n = 0;
        errno = 0;
        if (SSL_read_ex(t->ssl, (char *)buf + got, len - got, &n) == 1) {
            got += n;
            t->read_wants = 0;
            continue;
        }
        int e = SSL_get_error(t->ssl, 0);
        if (e == SSL_ERROR_ZERO_RETURN) {
            ERR_clear_error();
            if (got)
                return (ssize_t)got;
            return 0;
        }
        short wants = 0;
        int saved = errno;
        if (tls_classify(t, 0, &wants, why, sizeof(why)) > 0) {
            if (got)
                return (ssize_t)got;
            t->read_wants = wants;
            errno = EAGAIN;
            return -1;
        }
        if (got)
            return (ssize_t)got; /* the error shows again at the next call */
        log_debug("TLS read: %s", why);
        errno = e == SSL_ERROR_SYSCALL && saved ? saved : ECONNRESET;
        return -1;
    }
    return (ssize_t)got;
}

ssize_t tls_peek(tls_conn *t, void *buf, size_t len)
{
    char why[256];
    size_t n = 0;
    short wants = 0;
    ERR_clear_error();
    errno = 0;
    if (SSL_peek_ex(t->ssl, buf, len, &n) == 1)
        return (ssize_t)n;
    if (SSL_get_error(t->ssl, 0) == SSL_ERROR_ZERO_RETURN) {
        ERR_clear_error();
        return 0;
    }
    if (tls_classify(t, 0, &wants, why, sizeof(why)) > 0) {
        errno = EAGAIN;
        return -1;
    }
    errno = ECONNRESET;
    return -1;
}

void tls_close_quietly(tls_conn *t)
{
    if (t->ssl)
        SSL_set_quiet_shutdown(t->ssl, 1);
    tls_close(t);
}

void tls_shutdown_write(tls_conn *t)
{
    if (t->ssl && t->handshaken) {
        ERR_clear_error();
        SSL_shutdown(t->ssl);
        ERR_clear_error();
    }
}

ssize_t tls_write(tls_conn *t, const void *buf, size_t len)
{
    char why[256];
    size_t n = 0;
    ERR_clear_error();
    errno = 0;
    if (SSL_write_ex(t->ssl, buf, len, &n) == 1) {
        t->write_wants = 0;
        return (ssize_t)n;
    }
    int e = SSL_get_error(t->ssl, 0), saved = errno;
    short wants = 0;
    if (tls_classify(t, 0, &wants, why, sizeof(why)) > 0) {
        t->write_wants = wants;
        errno = EAGAIN;
        return -1;
    }
    log_debug("TLS write: %s", why);
    errno = e == SSL_ERROR_SYSCALL && saved ? saved : EPIPE;
    return -1;
}

void tls_describe(const tls_conn *t, char *buf, size_t len)
{
    if (!t->ssl) {
        if (len)
            buf[0] = '\0';
        return;
    }
    snprintf(buf, len, "%s %s", SSL_get_version(t->ssl), SSL_get_cipher_name(t->ssl));
}

bool tls_alpn_is_postgresql(const tls_conn *t)
{
    const unsigned char *p = NULL;
    unsigned int n = 0;
    SSL_get0_alpn_selected(t->ssl, &p, &n);
    return n == sizeof(tls_alpn_postgresql) - 1 && memcmp(p, tls_alpn_postgresql + 1, n) == 0;
}

bool tls_peer_common_name(const tls_conn *t, char *buf, size_t len)
{
    X509 *cert = SSL_get1_peer_certificate(t->ssl);
    if (!cert)
        return false;
    int n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, buf,
                                      (int)len);
    X509_free(cert);
    /* A name with a NUL inside would compare equal to its prefix: refused. */
    return n > 0 && (size_t)n < len && strlen(buf) == (size_t)n;
}

#define TLS_AUTH_SASL 10u          /* AuthenticationSASL's code */
#define TLS_PLUS_SUFFIX "-PLUS"     /* channel-binding mechanisms end so */

size_t tls_strip_sasl_plus(uint8_t *data, size_t n)
{
    size_t off = 0;
    while (off + PG_MSG_HEADER_LEN <= n) {
        uint32_t len = pg_get_u32(data + off + 1);
        if (len < 4 || len > n - off - 1)
            break; /* beyond this read (or not a length the scanner will take) */
        size_t end = off + 1 + len, body = off + PG_MSG_HEADER_LEN;
        if (data[off] == PG_MSG_AUTHENTICATION && len >= 8 &&
            pg_get_u32(data + body) == TLS_AUTH_SASL) {
            /* int32 10, then mechanism names, each NUL-terminated, then an empty one. */
            size_t in = body + 4, out = body + 4;
            while (in < end && data[in] != '\0') {
                size_t name = strnlen((const char *)data + in, end - in);
                if (in + name >= end)
                    break; /* unterminated: leave the rest to the client */
                size_t suffix = sizeof(TLS_PLUS_SUFFIX) - 1;
                bool plus = name >= suffix &&
                            memcmp(data + in + name - suffix, TLS_PLUS_SUFFIX, suffix) == 0;
                if (!plus) {
                    memmove(data + out, data + in, name + 1);
                    out += name + 1;
                }
                in += name + 1;
            }
            if (in > out) {
                /* The rest of the message (the list's end) and of the read move down. */
                memmove(data + out, data + in, n - in);
                n -= in - out;
                end -= in - out;
                pg_put_u32(data + off + 1, (uint32_t)(end - off - 1));
            }
        }
        off = end;
    }
    return n;
}

void tls_ktls_state(const tls_conn *t, bool *send, bool *recv)
{
    *send = t->ssl && BIO_get_ktls_send(SSL_get_wbio(t->ssl));
    *recv = t->ssl && BIO_get_ktls_recv(SSL_get_rbio(t->ssl));
}
