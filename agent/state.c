/* state.c - the agent's epoch and leader, kept in a small file so that they survive restarts.
 *
 * The file (state_file, else agent.state beside admin_socket) holds two lines:
 *     epoch 12
 *     leader pg1        ("-" for none)
 * It is written (temporary file, fsync, rename, fsync of the directory) before a table with a
 * new epoch is published, so no epoch a worker or the control plane saw is ever handed out
 * again, and a restarted proxy goes on from it instead of from 1.
 */
#include "agent.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define AGENT_STATE_EPOCH_MAX (1ULL << 53)

int agent_state_path(const config *cfg, char *buf, size_t len)
{
    if (cfg->state_file[0]) {
        if (snprintf(buf, len, "%s", cfg->state_file) >= (int)len)
            return -1;
        return 0;
    }
    if (!cfg->admin_socket[0])
        return -1;
    char dir[sizeof(cfg->admin_socket)];
    snprintf(dir, sizeof(dir), "%s", cfg->admin_socket);
    if (snprintf(buf, len, "%s/agent.state", dirname(dir)) >= (int)len)
        return -1;
    return 0;
}

bool agent_state_load(const config *cfg, uint64_t *epoch, char *leader, size_t len)
{
    char path[1100], line[256], name[CONFIG_NAME_MAX + 1];
    bool have_epoch = false;
    if (agent_state_path(cfg, path, sizeof(path)) != 0)
        return false;
    FILE *f = fopen(path, "r");
    if (!f) {
        if (errno != ENOENT)
            log_warning("cannot read the agent state %s: %s", path, strerror(errno));
        return false;
    }
    leader[0] = '\0';
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "epoch ", 6) == 0) {
            char *end;
            errno = 0;
            unsigned long long e = strtoull(line + 6, &end, 10);
            /* Epochs are what JSON carries exactly (the control plane's bound, 2^53). */
            if (errno || end == line + 6 || (*end && *end != '\n') || e > AGENT_STATE_EPOCH_MAX) {
                log_warning("agent state %s: bad epoch line; ignored", path);
                fclose(f);
                return false;
            }
            *epoch = (uint64_t)e;
            have_epoch = true;
        } else if (sscanf(line, "leader %64s", name) == 1) {
            snprintf(leader, len, "%s", strcmp(name, "-") == 0 ? "" : name);
        }
    }
    fclose(f);
    if (!have_epoch)
        log_warning("agent state %s has no epoch line; ignored", path);
    return have_epoch;
}

int agent_state_save(const config *cfg, uint64_t epoch, const char *leader)
{
    char path[1100], tmp[1110], dir[1100], text[160];
    int fd = -1, dfd = -1, rc = -1;
    if (agent_state_path(cfg, path, sizeof(path)) != 0)
        return 0; /* nowhere to keep it: nothing to do */
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    int n = snprintf(text, sizeof(text), "epoch %" PRIu64 "\nleader %s\n", epoch,
                     leader && leader[0] ? leader : "-");
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        log_error("cannot write the agent state %s: %s", tmp, strerror(errno));
        goto done;
    }
    if (write(fd, text, (size_t)n) != n || fsync(fd) != 0) {
        log_error("cannot write the agent state %s: %s", tmp, strerror(errno));
        goto done;
    }
    if (rename(tmp, path) != 0) {
        log_error("cannot rename %s to %s: %s", tmp, path, strerror(errno));
        goto done;
    }
    snprintf(dir, sizeof(dir), "%s", path);
    dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0)
        fsync(dfd);
    rc = 0;
done:
    if (fd >= 0)
        close(fd);
    if (dfd >= 0)
        close(dfd);
    return rc;
}
