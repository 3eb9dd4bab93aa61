/* store_members.h - the store's side of declared membership (store_members.c). */
#ifndef PGRELAY_STORE_MEMBERS_H
#define PGRELAY_STORE_MEMBERS_H

#include <jansson.h>

/* Declare node_id in deployment with options (an object; NULL for none), or replace its
 * options when it is declared already. 0 or -1. */
int store_member_save(const char *deployment, const char *node_id, json_t *options);

/* Forget a declared proxy: its membership and its proxies row. 0 or -1. */
int store_member_delete(const char *deployment, const char *node_id);

#endif
