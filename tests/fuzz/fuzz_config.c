/* fuzz_config.c - libFuzzer target: pgrelay.ini as a reload reads it (config_load_string).
 *
 * A reload (SIGHUP, the console's `reload`, a control-plane configuration change) parses
 * whatever the file holds. Whatever it is, loading must not crash or overrun; every problem is
 * reported as "file:line: message" and counted; and a file that loads must give every key a
 * value that `show config` can format. Input: the file's text (up to its first NUL).
 */
#include "config.h"
#include "log.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static config fuzz_cfg;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    log_current_level = LOG_LVL_ERROR;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    int n = config_load_string(&fuzz_cfg, "fuzz.ini", text);
    if (n != fuzz_cfg.n_errors || n < 0 || n > CONFIG_MAX_ERRORS)
        abort();
    for (int i = 0; i < n; i++) {
        const char *e = fuzz_cfg.errors[i];
        if (!memchr(e, '\0', CONFIG_ERROR_LEN) || strncmp(e, "fuzz.ini", 8) != 0)
            abort(); /* each error names the file (and line) */
    }
    if (n == 0) {
        char value[1100];
        for (size_t k = 0; k < config_n_keys; k++) {
            const config_key *key = &config_keys[k];
            if (strcmp(key->section, "node") == 0) {
                for (int i = 0; i < fuzz_cfg.n_nodes; i++)
                    config_format_value(&fuzz_cfg, key, &fuzz_cfg.nodes[i], value,
                                        sizeof(value));
            } else {
                config_format_value(&fuzz_cfg, key, &fuzz_cfg, value, sizeof(value));
            }
            if (!memchr(value, '\0', sizeof(value)))
                abort();
        }
    }
    free(text);
    return 0;
}
