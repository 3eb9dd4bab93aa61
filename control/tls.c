/* tls.c - HTTPS for the control plane's API: the server's OpenSSL context.
 *
 * libevent's evhttp speaks HTTP over an OpenSSL bufferevent (http.c makes one per connection
 * from the context built here). Agents and pgrelayctl carry bearer tokens, so any address
 * beyond loopback should be served over TLS (`pgrelay-control -t` says so).
 */
#include "tls.h"

#include <openssl/err.h>
#include <stdio.h>
#include <string.h>

/* OpenSSL's last error as text ("" when none). */
static void tls_reason(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    if (e)
        ERR_error_string_n(e, buf, len);
    else
        snprintf(buf, len, "unknown error");
    ERR_clear_error();
}

SSL_CTX *tls_server_ctx(const char *cert_file, const char *key_file, const char *client_ca,
                        char *err, size_t err_len)
{
    char why[256];
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        tls_reason(why, sizeof(why));
        snprintf(err, err_len, "cannot create a TLS context: %s", why);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
        tls_reason(why, sizeof(why));
        snprintf(err, err_len, "tls_cert_file %s: %s", cert_file, why);
        goto failed;
    }
    /* OpenSSL also refuses here a key that does not match the certificate. */
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        tls_reason(why, sizeof(why));
        snprintf(err, err_len, "tls_key_file %s is not a usable key for tls_cert_file %s (%s)",
                 key_file, cert_file, why);
        goto failed;
    }
    if (client_ca && client_ca[0]) {
        if (SSL_CTX_load_verify_locations(ctx, client_ca, NULL) != 1) {
            tls_reason(why, sizeof(why));
            snprintf(err, err_len, "tls_client_ca_file %s: %s", client_ca, why);
            goto failed;
        }
        STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(client_ca);
        if (names)
            SSL_CTX_set_client_CA_list(ctx, names);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    }
    return ctx;

failed:
    SSL_CTX_free(ctx);
    return NULL;
}

bool tls_addr_is_loopback(const char *addr)
{
    return strcmp(addr, "localhost") == 0 || strncmp(addr, "127.", 4) == 0 ||
           strcmp(addr, "::1") == 0 || strcmp(addr, "[::1]") == 0;
}
