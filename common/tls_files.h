/* tls_files.h - OpenSSL context pieces the proxy and the control plane share: OpenSSL's error
 * text, a certificate chain with its key, and the CA client certificates must chain to. */
#ifndef PGRELAY_TLS_FILES_H
#define PGRELAY_TLS_FILES_H

#include <openssl/ssl.h>
#include <stddef.h>

/* OpenSSL's last error as text ("unknown error" when the queue is empty); empties the queue. */
void tls_error_text(char *buf, size_t len);

/* Loads the certificate chain cert_file and the PEM key key_file into ctx and checks that they
 * match. cert_key and key_key are the settings' names, used in err. 0, or -1 with err naming
 * the setting, the file and OpenSSL's reason. */
int tls_use_cert_and_key(SSL_CTX *ctx, const char *cert_key, const char *cert_file,
                         const char *key_key, const char *key_file, char *err, size_t err_len);

/* Trusts the CAs in ca_file (setting ca_key) for verifying peers. 0, or -1 with err filled. */
int tls_load_ca(SSL_CTX *ctx, const char *ca_key, const char *ca_file, char *err,
                size_t err_len);

/* tls_load_ca, then requires every client to present a certificate signed by those CAs (and
 * names them in the handshake's CertificateRequest). 0, or -1 with err filled. */
int tls_require_client_certs(SSL_CTX *ctx, const char *ca_key, const char *ca_file, char *err,
                             size_t err_len);

/* A file's content read once into memory: the setting that names it, its path (both for
 * errors) and its bytes. */
typedef struct tls_pem {
    const char *key;
    const char *file;
    const char *data;
    size_t len;
} tls_pem;

/* tls_use_cert_and_key from bytes: the chain in cert (leaf first), the key in key. */
int tls_pem_use_cert_and_key(SSL_CTX *ctx, const tls_pem *cert, const tls_pem *key, char *err,
                             size_t err_len);

/* tls_load_ca from bytes: trusts the certificates (and CRLs) in ca. */
int tls_pem_load_ca(SSL_CTX *ctx, const tls_pem *ca, char *err, size_t err_len);

/* tls_require_client_certs from bytes. */
int tls_pem_require_client_certs(SSL_CTX *ctx, const tls_pem *ca, char *err, size_t err_len);

#endif
