/* tls_files.c - OpenSSL context pieces the proxy (proxy/tls.c) and the control plane
 * (control/tls.c) share: OpenSSL's error text, a certificate chain with its key, and the CA
 * client certificates must chain to. Error texts name the setting and the file. */
#include "tls_files.h"

#include <openssl/err.h>
#include <stdio.h>

void tls_error_text(char *buf, size_t len)
{
    unsigned long e = ERR_peek_last_error();
    if (e)
        ERR_error_string_n(e, buf, len);
    else
        snprintf(buf, len, "unknown error");
    ERR_clear_error();
}

int tls_use_cert_and_key(SSL_CTX *ctx, const char *cert_key, const char *cert_file,
                         const char *key_key, const char *key_file, char *err, size_t err_len)
{
    char why[256];
    if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
        tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "%s %s: %s", cert_key, cert_file, why);
        return -1;
    }
    /* OpenSSL also refuses here a key that does not match the certificate. */
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "%s %s is not a usable key for %s %s (%s)", key_key, key_file,
                 cert_key, cert_file, why);
        return -1;
    }
    return 0;
}

int tls_load_ca(SSL_CTX *ctx, const char *ca_key, const char *ca_file, char *err,
                size_t err_len)
{
    char why[256];
    if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
        tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "%s %s: %s", ca_key, ca_file, why);
        return -1;
    }
    return 0;
}

int tls_require_client_certs(SSL_CTX *ctx, const char *ca_key, const char *ca_file, char *err,
                             size_t err_len)
{
    if (tls_load_ca(ctx, ca_key, ca_file, err, err_len) != 0)
        return -1;
    STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca_file);
    if (names)
        SSL_CTX_set_client_CA_list(ctx, names);
    ERR_clear_error();
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    return 0;
}
