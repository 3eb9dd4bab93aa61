/* tls_files.c - OpenSSL context pieces the proxy (proxy/tls.c) and the control plane
 * (control/tls.c) share: OpenSSL's error text, a certificate chain with its key, and the CA
 * client certificates must chain to. Error texts name the setting and the file. */
#include "tls_files.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdbool.h>
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

/* A reader over a file's bytes; NULL (err filled) when OpenSSL has no memory. */
static BIO *tls_pem_bio(const tls_pem *p, char *err, size_t err_len)
{
    BIO *bio = BIO_new_mem_buf(p->data, (int)p->len);
    if (!bio)
        snprintf(err, err_len, "%s %s: out of memory", p->key, p->file);
    return bio;
}

/* A key is never asked for a passphrase: a daemon has no one to ask. */
static int tls_pem_no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1;
}

/* After reading certificates up to the end: true when the end was all that stopped the
 * reading (OpenSSL's "no start line"), which it then forgets. */
static bool tls_pem_ended_cleanly(void)
{
    unsigned long e = ERR_peek_last_error();
    if (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE) {
        ERR_clear_error();
        return true;
    }
    return e == 0;
}

int tls_pem_use_cert_and_key(SSL_CTX *ctx, const tls_pem *cert, const tls_pem *key, char *err,
                             size_t err_len)
{
    char why[256];
    BIO *bio = tls_pem_bio(cert, err, err_len);
    if (!bio)
        return -1;
    ERR_clear_error();
    X509 *leaf = PEM_read_bio_X509_AUX(bio, NULL, tls_pem_no_passphrase, NULL);
    bool ok = leaf && SSL_CTX_use_certificate(ctx, leaf) == 1 &&
              SSL_CTX_clear_chain_certs(ctx) == 1;
    X509_free(leaf);
    while (ok) { /* the chain: every certificate after the leaf */
        X509 *ca = PEM_read_bio_X509(bio, NULL, tls_pem_no_passphrase, NULL);
        if (!ca) {
            ok = tls_pem_ended_cleanly();
            break;
        }
        if (SSL_CTX_add0_chain_cert(ctx, ca) != 1) {
            X509_free(ca);
            ok = false;
        }
    }
    BIO_free(bio);
    if (!ok) {
        tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "%s %s: %s", cert->key, cert->file, why);
        return -1;
    }
    bio = tls_pem_bio(key, err, err_len);
    if (!bio)
        return -1;
    EVP_PKEY *pkey = PEM_read_bio_PrivateKey(bio, NULL, tls_pem_no_passphrase, NULL);
    BIO_free(bio);
    /* OpenSSL also refuses here a key that does not match the certificate. */
    ok = pkey && SSL_CTX_use_PrivateKey(ctx, pkey) == 1 && SSL_CTX_check_private_key(ctx) == 1;
    EVP_PKEY_free(pkey);
    if (!ok) {
        tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "%s %s is not a usable key for %s %s (%s)", key->key, key->file,
                 cert->key, cert->file, why);
        return -1;
    }
    return 0;
}

/* Trusts the certificates and CRLs in ca; with names, also collects the certificates'
 * subjects (the CAs a client certificate may come from). */
static int tls_pem_read_ca(SSL_CTX *ctx, const tls_pem *ca, STACK_OF(X509_NAME) *names,
                           char *err, size_t err_len)
{
    char why[256];
    BIO *bio = tls_pem_bio(ca, err, err_len);
    if (!bio)
        return -1;
    ERR_clear_error();
    STACK_OF(X509_INFO) *infos = PEM_X509_INFO_read_bio(bio, NULL, tls_pem_no_passphrase, NULL);
    BIO_free(bio);
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    int found = 0;
    bool ok = infos != NULL;
    for (int i = 0; ok && i < sk_X509_INFO_num(infos); i++) {
        X509_INFO *info = sk_X509_INFO_value(infos, i);
        if (info->x509) {
            ok = X509_STORE_add_cert(store, info->x509) == 1;
            /* each CA named once, as SSL_load_client_CA_file does (a bundle in a CA's
             * rotation holds two certificates with one subject) */
            X509_NAME *subject = X509_get_subject_name(info->x509);
            X509_NAME *name = ok && names && sk_X509_NAME_find(names, subject) < 0
                                  ? X509_NAME_dup(subject)
                                  : NULL;
            if (name && sk_X509_NAME_push(names, name) <= 0)
                X509_NAME_free(name);
            found++;
        }
        if (ok && info->crl) {
            ok = X509_STORE_add_crl(store, info->crl) == 1;
            found++;
        }
    }
    sk_X509_INFO_pop_free(infos, X509_INFO_free);
    if (!ok || found == 0) {
        if (ok)
            snprintf(why, sizeof(why), "no certificate or CRL in the file");
        else
            tls_error_text(why, sizeof(why));
        snprintf(err, err_len, "%s %s: %s", ca->key, ca->file, why);
        return -1;
    }
    return 0;
}

int tls_pem_load_ca(SSL_CTX *ctx, const tls_pem *ca, char *err, size_t err_len)
{
    return tls_pem_read_ca(ctx, ca, NULL, err, err_len);
}

static int tls_pem_name_cmp(const X509_NAME *const *a, const X509_NAME *const *b)
{
    return X509_NAME_cmp(*a, *b);
}

int tls_pem_require_client_certs(SSL_CTX *ctx, const tls_pem *ca, char *err, size_t err_len)
{
    STACK_OF(X509_NAME) *names = sk_X509_NAME_new(tls_pem_name_cmp);
    if (tls_pem_read_ca(ctx, ca, names, err, err_len) != 0) {
        sk_X509_NAME_pop_free(names, X509_NAME_free);
        return -1;
    }
    if (names)
        SSL_CTX_set_client_CA_list(ctx, names); /* takes them */
    ERR_clear_error();
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    return 0;
}
