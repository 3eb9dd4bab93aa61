/* tls.c - HTTPS for the control plane's API: the server's OpenSSL context.
 *
 * libevent's evhttp speaks HTTP over an OpenSSL bufferevent (http.c makes one per connection
 * from the context built here). Agents and pgrelayctl carry bearer tokens, so any address
 * beyond loopback should be served over TLS (`pgrelay-control -t` says so).
 */
#include "tls.h"
#include "tls_files.h"

#include <stdio.h>
#include <string.h>

SSL_CTX *tls_server_ctx(const char *cert_file, const char *key_file, const char *client_ca,
                        char *err, size_t err_len)
{
    char why[256];
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "cannot create a TLS context: %s", why);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (tls_use_cert_and_key(ctx, "tls_cert_file", cert_file, "tls_key_file", key_file, err,
                             err_len) != 0)
        goto failed;
    if (client_ca && client_ca[0] &&
        tls_require_client_certs(ctx, "tls_client_ca_file", client_ca, err, err_len) != 0)
        goto failed;
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
