/* tls.h - HTTPS for the control plane's API: the server's OpenSSL context (tls.c). */
#ifndef PGRELAY_CONTROL_TLS_H
#define PGRELAY_CONTROL_TLS_H

#include <openssl/ssl.h>
#include <stdbool.h>
#include <stddef.h>

/* A server context from a certificate chain and key (PEM), TLS 1.2 or later; with client_ca
 * not empty, a client certificate signed by it is required. NULL with err filled (the file
 * and OpenSSL's reason) when a file is missing or unusable, or the key does not match. */
SSL_CTX *tls_server_ctx(const char *cert_file, const char *key_file, const char *client_ca,
                        char *err, size_t err_len);

/* Is addr (listen_addr) a loopback address or name? */
bool tls_addr_is_loopback(const char *addr);

#endif
