/* inifile.h - what pgrelay.ini and control.ini share: the line-by-line reader around inih and
 * the syntax of values (durations, booleans, words).
 *
 * The reader feeds inih one line at a time so that it can count lines itself, report a
 * [section] header even when no key follows, take an indented key as a key (inih would make it
 * a continuation of the previous value), and parse lines longer than inih's buffer itself. Each
 * configuration module keeps its own key table and messages; it gets callbacks.
 */
#ifndef PGRELAY_INIFILE_H
#define PGRELAY_INIFILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define INIFILE_LINE_MAX    8192 /* longest line accepted, newline included */
#define INIFILE_SECTION_MAX 128  /* longest [section] name kept */

/* Types a key's value can have. */
typedef enum inifile_type {
    KEY_STRING,     /* copied into a char[size] field */
    KEY_INT,        /* decimal integer within [min, max], stored as int */
    KEY_DURATION,   /* a duration (see inifile_duration) within [min, max] ms, stored as int ms */
    KEY_DURATION64, /* the same, stored as int64_t ms */
    KEY_BOOL,       /* on/off, true/false, yes/no, 1/0, stored as bool */
    KEY_ENUM,       /* one of a fixed list of words, stored as its index (int) */
    KEY_MODE,       /* octal file permission bits within [min, max], e.g. 0660, stored as int */
} inifile_type;

/* One row of a key table: everything parsing, validation, reload, `show config` and the man
 * page need. */
typedef struct inifile_key {
    const char *section;      /* section name; one name stands for all [prefix.NAME] sections */
    const char *name;         /* key name as written in the file */
    inifile_type type;
    const char *def;          /* default, as it would be written in the file; NULL = required */
    bool reloadable;          /* takes effect on reload without a restart */
    size_t offset;            /* field offset in the struct the section fills */
    size_t size;              /* field size */
    int64_t min, max;         /* KEY_INT, KEY_DURATION* (ms) and KEY_MODE bounds */
    const char *const *words; /* KEY_ENUM: NULL-terminated list */
    const char *help;         /* one line for `show config` and the man page */
} inifile_key;

/* Store value into key's field of base. NULL, or why (filled with the reason). */
const char *inifile_set(const inifile_key *key, void *base, const char *value, char *why,
                        size_t why_len);

/* The field's value as it would be written in the file (durations in their largest whole unit). */
void inifile_format(const inifile_key *key, const void *base, char *buf, size_t len);

typedef struct inifile_handlers {
    /* A [section] header (line is its line number). */
    void (*section)(void *user, int line, const char *section);
    /* A key = value line; section is "" before the first header. */
    void (*key)(void *user, int line, const char *section, const char *name, const char *value);
    /* A line that could not be read (line 0: the file as a whole). */
    void (*error)(void *user, int line, const char *message);
} inifile_handlers;

/* Read everything from fp, or from text when fp is NULL. */
void inifile_read(FILE *fp, const char *text, const inifile_handlers *h, void *user);

/* "250ms", "5s", "2m" (or "2min"), "1h", "7d"; a bare number is seconds. 0 and *ms set, or -1
 * (*ms untouched) when it is not a duration or exceeds max_ms. */
int inifile_duration(const char *text, int64_t max_ms, int64_t *ms);

/* on/off, true/false, yes/no, 1/0 (any case): 1, 0, or -1. */
int inifile_bool(const char *text);

/* Index of text in the NULL-terminated words (any case), or -1. */
int inifile_word(const char *const *words, const char *text);

/* Move *start past leading blanks and cut trailing ones off (in place). */
void inifile_trim(char **start);

/* "a, b, c" of the words, for messages. */
void inifile_word_list(const char *const *words, char *buf, size_t len);

#endif
