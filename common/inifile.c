/* inifile.c - the INI reader and value syntax shared by pgrelay.ini and control.ini. */
#include "inifile.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct inifile_state {
    FILE *fp;         /* file source, or NULL */
    const char *text; /* string source when fp is NULL */
    int line;         /* number of the line inih is looking at */
    char section[INIFILE_SECTION_MAX];
    const inifile_handlers *h;
    void *user;
} inifile_state;

static void inifile_error(inifile_state *s, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void inifile_error(inifile_state *s, int line, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    s->h->error(s->user, line, msg);
}

/* One whole line into line (NUL-terminated, newline kept). False at the end; *too_long is set
 * (and the rest of the line skipped) when it does not fit. */
static bool inifile_line(inifile_state *s, char *line, size_t cap, bool *too_long)
{
    size_t len = 0;
    *too_long = false;
    for (;;) {
        int c;
        if (s->fp)
            c = fgetc(s->fp);
        else
            c = *s->text ? (unsigned char)*s->text++ : EOF;
        if (c == EOF)
            break;
        if (len + 2 < cap)
            line[len++] = (char)c;
        else
            *too_long = true;
        if (c == '\n')
            break;
    }
    line[len] = '\0';
    return len > 0 || *too_long;
}

void inifile_trim(char **start)
{
    char *a = *start, *e = a + strlen(a);
    while (isspace((unsigned char)*a))
        a++;
    while (e > a && isspace((unsigned char)e[-1]))
        *--e = '\0';
    *start = a;
}

/* A key = value line too long for inih's buffer: parsed here, as inih would. */
static void inifile_long_line(inifile_state *s, char *text)
{
    if (*text == ';' || *text == '#')
        return;
    size_t at = strcspn(text, "=:");
    if (text[at] == '\0') {
        inifile_error(s, s->line, "syntax error (expected [section], key = value, or a ; comment)");
        return;
    }
    text[at] = '\0';
    char *name = text, *value = text + at + 1;
    for (char *c = value; *c; c++) {
        if (*c == ';' && c > value && isspace((unsigned char)c[-1])) {
            *c = '\0'; /* inline comment, as inih */
            break;
        }
    }
    inifile_trim(&name);
    inifile_trim(&value);
    s->h->key(s->user, s->line, s->section, name, value);
}

/* inih's reader: one line at a time, blanks in front removed, headers reported here, long
 * lines parsed here (inih gets a comment instead). */
static char *inifile_reader(char *buf, int size, void *stream)
{
    inifile_state *s = stream;
    char line[INIFILE_LINE_MAX];
    bool too_long;

    if (!inifile_line(s, line, sizeof(line), &too_long))
        return NULL;
    s->line++;
    char *text = line;
    while (*text == ' ' || *text == '\t')
        text++;
    if (too_long) {
        inifile_error(s, s->line, "line is longer than %d characters", INIFILE_LINE_MAX - 2);
        snprintf(buf, (size_t)size, ";\n");
        return buf;
    }
    if (*text == '[') {
        const char *close = strchr(text, ']');
        if (close) {
            char section[INIFILE_SECTION_MAX];
            size_t n = (size_t)(close - text - 1);
            if (n >= sizeof(section))
                n = sizeof(section) - 1;
            memcpy(section, text + 1, n);
            section[n] = '\0';
            char *a = section;
            inifile_trim(&a);
            snprintf(s->section, sizeof(s->section), "%s", a);
            s->h->section(s->user, s->line, a);
        }
    }
    size_t len = strlen(text);
    if (len < (size_t)size - 1) {
        memcpy(buf, text, len + 1);
        return buf;
    }
    inifile_trim(&text);
    inifile_long_line(s, text);
    snprintf(buf, (size_t)size, ";\n");
    return buf;
}

static int inifile_handler(void *user, const char *section, const char *name, const char *value)
{
    inifile_state *s = user;
    (void)section; /* ours is the whole name, inih's may be cut at its buffer */
    s->h->key(s->user, s->line, s->section, name, value);
    return 1;
}

void inifile_read(FILE *fp, const char *text, const inifile_handlers *h, void *user)
{
    inifile_state s = {.fp = fp, .text = text ? text : "", .h = h, .user = user};
    int rc = ini_parse_stream(inifile_reader, &s, inifile_handler, &s);
    if (rc > 0)
        inifile_error(&s, rc, "syntax error (expected [section], key = value, or a ; comment)");
    else if (rc < 0)
        inifile_error(&s, 0, "could not parse (out of memory)");
}

int inifile_duration(const char *text, int64_t max_ms, int64_t *ms)
{
    static const struct {
        const char *unit;
        int64_t ms;
    } units[] = {{"", 1000},         {"s", 1000},          {"ms", 1},
                 {"m", 60 * 1000},   {"min", 60 * 1000},   {"h", 60 * 60 * 1000},
                 {"d", 24 * 60 * 60 * 1000}};
    char *end;

    while (isspace((unsigned char)*text))
        text++;
    if (!isdigit((unsigned char)*text))
        return -1;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno != 0)
        return -1;
    while (isspace((unsigned char)*end))
        end++;
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
        if (strcmp(end, units[i].unit) != 0)
            continue;
        if (v > max_ms / units[i].ms)
            return -1;
        *ms = (int64_t)v * units[i].ms;
        return 0;
    }
    return -1;
}

int inifile_bool(const char *text)
{
    static const char *const yes[] = {"on", "true", "yes", "1"};
    static const char *const no[] = {"off", "false", "no", "0"};
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (strcasecmp(text, yes[i]) == 0)
            return 1;
        if (strcasecmp(text, no[i]) == 0)
            return 0;
    }
    return -1;
}

int inifile_word(const char *const *words, const char *text)
{
    for (int i = 0; words[i]; i++)
        if (strcasecmp(words[i], text) == 0)
            return i;
    return -1;
}

void inifile_word_list(const char *const *words, char *buf, size_t len)
{
    size_t off = 0;
    buf[0] = '\0';
    for (int i = 0; words[i] && off < len; i++)
        off += (size_t)snprintf(buf + off, len - off, "%s%s", i ? ", " : "", words[i]);
}

/* "0s", "250ms", "5s", "7d": the largest unit that divides the value. */
static void inifile_format_ms(int64_t ms, char *buf, size_t len)
{
    const int64_t day = 24LL * 60 * 60 * 1000;
    if (ms != 0 && ms % day == 0)
        snprintf(buf, len, "%lldd", (long long)(ms / day));
    else if (ms % 1000 == 0)
        snprintf(buf, len, "%llds", (long long)(ms / 1000));
    else
        snprintf(buf, len, "%lldms", (long long)ms);
}

static const char *inifile_set_duration(const inifile_key *key, const char *value, int64_t *ms,
                                        char *why, size_t why_len)
{
    char bound[32];
    if (inifile_duration(value, INT64_MAX, ms) != 0) {
        snprintf(why, why_len, "\"%s\" is not a duration (examples: 250ms, 5s, 2m, 7d)", value);
        return why;
    }
    if (*ms < key->min || *ms > key->max) {
        inifile_format_ms(*ms < key->min ? key->min : key->max, bound, sizeof(bound));
        snprintf(why, why_len, "%s is out of range (at %s %s)", value,
                 *ms < key->min ? "least" : "most", bound);
        return why;
    }
    return NULL;
}

const char *inifile_set(const inifile_key *key, void *base, const char *value, char *why,
                        size_t why_len)
{
    char *field = (char *)base + key->offset;
    int64_t ms;
    long long v;
    char *end;

    switch (key->type) {
    case KEY_STRING:
        if (strlen(value) >= key->size) {
            snprintf(why, why_len, "value is longer than %zu characters", key->size - 1);
            return why;
        }
        if (value[0] == '\0' && key->def == NULL) {
            snprintf(why, why_len, "value must not be empty");
            return why;
        }
        memcpy(field, value, strlen(value) + 1);
        return NULL;
    case KEY_INT:
        errno = 0;
        v = strtoll(value, &end, 10);
        if (errno || end == value || *end != '\0') {
            snprintf(why, why_len, "\"%s\" is not an integer", value);
            return why;
        }
        if (v < key->min || v > key->max) {
            snprintf(why, why_len, "%lld is out of range (%lld to %lld)", v, (long long)key->min,
                     (long long)key->max);
            return why;
        }
        *(int *)field = (int)v;
        return NULL;
    case KEY_DURATION:
        if (inifile_set_duration(key, value, &ms, why, why_len))
            return why;
        *(int *)field = (int)ms; /* the key's max keeps it within an int */
        return NULL;
    case KEY_DURATION64:
        if (inifile_set_duration(key, value, &ms, why, why_len))
            return why;
        *(int64_t *)field = ms;
        return NULL;
    case KEY_BOOL: {
        int b = inifile_bool(value);
        if (b < 0) {
            snprintf(why, why_len, "\"%s\" is not a boolean (on or off)", value);
            return why;
        }
        *(bool *)field = b;
        return NULL;
    }
    case KEY_MODE:
        errno = 0;
        v = strtoll(value, &end, 8);
        if (errno || end == value || *end != '\0' || v < key->min || v > key->max) {
            snprintf(why, why_len, "\"%s\" is not an octal mode such as 0660", value);
            return why;
        }
        *(int *)field = (int)v;
        return NULL;
    case KEY_ENUM: {
        int i = inifile_word(key->words, value);
        if (i < 0) {
            char list[256];
            inifile_word_list(key->words, list, sizeof(list));
            snprintf(why, why_len, "\"%.60s\" is not one of: %.160s", value, list);
            return why;
        }
        *(int *)field = i;
        return NULL;
    }
    }
    snprintf(why, why_len, "unknown key type");
    return why;
}

void inifile_format(const inifile_key *key, const void *base, char *buf, size_t len)
{
    const char *field = (const char *)base + key->offset;
    switch (key->type) {
    case KEY_STRING:
        snprintf(buf, len, "%s", field);
        break;
    case KEY_INT:
        snprintf(buf, len, "%d", *(const int *)field);
        break;
    case KEY_DURATION:
        inifile_format_ms(*(const int *)field, buf, len);
        break;
    case KEY_DURATION64:
        inifile_format_ms(*(const int64_t *)field, buf, len);
        break;
    case KEY_BOOL:
        snprintf(buf, len, "%s", *(const bool *)field ? "on" : "off");
        break;
    case KEY_ENUM:
        snprintf(buf, len, "%s", key->words[*(const int *)field]);
        break;
    case KEY_MODE:
        snprintf(buf, len, "%04o", *(const int *)field);
        break;
    }
}
