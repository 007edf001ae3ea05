// Reference values from the real ggml (the C library llama.cpp uses), for tests/ggml_oracle.rs.
// Build and run with make_ggml_fixture.sh, which links this against a llama.cpp build
// (ggml-base: the *_ref quantizers, ggml_quantize_chunk and to_float, compiled without
// -march=native; ggml-cpu: the native activation quantizers and dot products). Prints JSON on
// stdout. Sections: rows (the f32 inputs), ref, act, dot, chunk, deq, dot_n.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-cpu.h"

// From ggml/src/ggml-quants.h (internal header): the reference quantizers.
void quantize_row_q4_0_ref(const float * x, void * y, int64_t k);
void quantize_row_q4_1_ref(const float * x, void * y, int64_t k);
void quantize_row_q5_0_ref(const float * x, void * y, int64_t k);
void quantize_row_q5_1_ref(const float * x, void * y, int64_t k);
void quantize_row_q8_0_ref(const float * x, void * y, int64_t k);
void quantize_row_q8_1_ref(const float * x, void * y, int64_t k);
void quantize_row_q4_K_ref(const float * x, void * y, int64_t k);
void quantize_row_q5_K_ref(const float * x, void * y, int64_t k);
void quantize_row_q6_K_ref(const float * x, void * y, int64_t k);
void quantize_row_q8_K_ref(const float * x, void * y, int64_t k);
void quantize_row_q2_K_ref(const float * x, void * y, int64_t k);
void quantize_row_q3_K_ref(const float * x, void * y, int64_t k);
void quantize_row_iq4_nl_ref(const float * x, void * y, int64_t k);
void quantize_row_iq4_xs_ref(const float * x, void * y, int64_t k);

#define N 512
#define ROWS 5

static uint64_t st = 0x243F6A8885A308D3ull;
static uint64_t next(void) {  // splitmix64
    uint64_t z = (st += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float uni(void) { return (float)(next() >> 40) / (float)(1u << 23) - 1.0f; }
static float gauss(void) { return uni() + uni() + uni() + uni(); }

static void hex(const void * p, size_t n) {
    const uint8_t * b = p;
    putchar('"');
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    putchar('"');
}

typedef void (*qref_t)(const float *, void *, int64_t);
struct qt { const char * name; enum ggml_type ty; qref_t ref; };

int main(void) {
    ggml_cpu_init();
    static float x[ROWS][N];
    for (int i = 0; i < N; i++) {
        x[0][i] = gauss();
        x[1][i] = gauss() * 1e-3f;
        x[2][i] = uni() * 4.0f + 1.0f;
        x[3][i] = gauss() * ((i % 97) == 0 ? 20.0f : 0.5f);  // outliers
        x[4][i] = (i / 32) % 3 == 0 ? 0.0f : ((i / 32) % 3 == 1 ? 0.25f : (float)(i % 32 - 16) * 0.5f);
    }
    const struct qt types[] = {
        {"Q4_0", GGML_TYPE_Q4_0, quantize_row_q4_0_ref}, {"Q4_1", GGML_TYPE_Q4_1, quantize_row_q4_1_ref},
        {"Q5_0", GGML_TYPE_Q5_0, quantize_row_q5_0_ref}, {"Q5_1", GGML_TYPE_Q5_1, quantize_row_q5_1_ref},
        {"Q8_0", GGML_TYPE_Q8_0, quantize_row_q8_0_ref}, {"Q8_1", GGML_TYPE_Q8_1, quantize_row_q8_1_ref},
        {"Q4_K", GGML_TYPE_Q4_K, quantize_row_q4_K_ref}, {"Q5_K", GGML_TYPE_Q5_K, quantize_row_q5_K_ref},
        {"Q6_K", GGML_TYPE_Q6_K, quantize_row_q6_K_ref}, {"Q8_K", GGML_TYPE_Q8_K, quantize_row_q8_K_ref},
        {"F16", GGML_TYPE_F16, NULL}, {"BF16", GGML_TYPE_BF16, NULL},
        {"Q2_K", GGML_TYPE_Q2_K, quantize_row_q2_K_ref}, {"Q3_K", GGML_TYPE_Q3_K, quantize_row_q3_K_ref},
        {"IQ4_NL", GGML_TYPE_IQ4_NL, quantize_row_iq4_nl_ref}, {"IQ4_XS", GGML_TYPE_IQ4_XS, quantize_row_iq4_xs_ref},
    };
    const int nt = sizeof(types) / sizeof(types[0]);
    static uint8_t buf[ROWS][8192], act[ROWS][8192];

    printf("{\n\"n\": %d,\n\"rows\": [", N);
    for (int r = 0; r < ROWS; r++) { if (r) printf(",\n"); hex(x[r], sizeof(float) * N); }
    printf("],\n\"ref\": [");
    int first = 1;
    for (int t = 0; t < nt; t++) {
        if (!types[t].ref) continue;
        for (int r = 0; r < ROWS; r++) {
            types[t].ref(x[r], buf[r], N);
            printf("%s\n{\"type\": \"%s\", \"row\": %d, \"hex\": ", first ? "" : ",", types[t].name, r);
            hex(buf[r], ggml_row_size(types[t].ty, N));
            printf("}");
            first = 0;
        }
    }
    // Activation quantizers as ggml-cpu runs them natively.
    printf("],\n\"act\": [");
    first = 1;
    const char * acts[] = {"Q8_0", "Q8_1", "Q8_K", "F16", "BF16"};
    const enum ggml_type act_ty[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q8_1, GGML_TYPE_Q8_K, GGML_TYPE_F16, GGML_TYPE_BF16};
    for (int a = 0; a < 5; a++) {
        for (int r = 0; r < ROWS; r++) {
            ggml_get_type_traits_cpu(act_ty[a])->from_float(x[r], act[r], N);
            printf("%s\n{\"type\": \"%s\", \"row\": %d, \"hex\": ", first ? "" : ",", acts[a], r);
            hex(act[r], ggml_row_size(act_ty[a], N));
            printf("}");
            first = 0;
        }
    }
    // Dot products: weights = reference quantization (or ggml conversion) of row w, activations
    // = ggml-cpu's quantization of row a to the weight type's vec_dot_type.
    printf("],\n\"dot\": [");
    first = 1;
    for (int t = 0; t < nt; t++) {
        const struct ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(types[t].ty);
        if (types[t].ty == GGML_TYPE_Q8_1 || types[t].ty == GGML_TYPE_Q8_K) continue;
        for (int w = 0; w < ROWS; w++) {
            int a = (w + 1) % ROWS;
            if (types[t].ref) types[t].ref(x[w], buf[0], N);
            else tr->from_float(x[w], buf[0], N);
            ggml_get_type_traits_cpu(tr->vec_dot_type)->from_float(x[a], act[0], N);
            float s = 0;
            tr->vec_dot(N, &s, 0, buf[0], 0, act[0], 0, 1);
            uint32_t bits; memcpy(&bits, &s, 4);
            printf("%s\n{\"type\": \"%s\", \"act_type\": \"%s\", \"w_row\": %d, \"a_row\": %d, \"value_bits\": %u}",
                   first ? "" : ",", types[t].name, ggml_type_name(tr->vec_dot_type), w, a, bits);
            first = 0;
        }
    }
    // What llama-quantize writes without an importance matrix (ggml_quantize_chunk, one row).
    // The same as the *_ref quantizers except for IQ4_NL (quantize_iq4_nl searches the scale).
    printf("],\n\"chunk\": [");
    first = 1;
    for (int t = 0; t < nt; t++) {
        if (!types[t].ref || types[t].ty == GGML_TYPE_Q8_1 || types[t].ty == GGML_TYPE_Q8_K) continue;
        for (int r = 0; r < ROWS; r++) {
            ggml_quantize_chunk(types[t].ty, x[r], buf[r], 0, 1, N, NULL);
            printf("%s\n{\"type\": \"%s\", \"row\": %d, \"hex\": ", first ? "" : ",", types[t].name, r);
            hex(buf[r], ggml_row_size(types[t].ty, N));
            printf("}");
            first = 0;
        }
    }
    // ggml-base's dequantization (to_float) of the reference quantization of each row, for the
    // types added with Q2_K / Q3_K / IQ4_NL / IQ4_XS.
    printf("],\n\"deq\": [");
    first = 1;
    static float deq[N];
    for (int t = 0; t < nt; t++) {
        enum ggml_type ty = types[t].ty;
        if (ty != GGML_TYPE_Q2_K && ty != GGML_TYPE_Q3_K && ty != GGML_TYPE_IQ4_NL && ty != GGML_TYPE_IQ4_XS) continue;
        for (int r = 0; r < ROWS; r++) {
            types[t].ref(x[r], buf[r], N);
            ggml_get_type_traits(ty)->to_float(buf[r], deq, N);
            printf("%s\n{\"type\": \"%s\", \"row\": %d, \"src_hex\": ", first ? "" : ",", types[t].name, r);
            hex(buf[r], ggml_row_size(ty, N));
            printf(", \"hex\": ");
            hex(deq, sizeof(float) * N);
            printf("}");
            first = 0;
        }
    }
    // Dot products over a prefix of n < N elements (the first n / block_size blocks of the
    // same weight and activation rows): IQ4_NL with an odd block count runs ggml's scalar tail.
    printf("],\n\"dot_n\": [");
    first = 1;
    for (int t = 0; t < nt; t++) {
        enum ggml_type ty = types[t].ty;
        int ns[3] = {0, 0, 0};
        if (ty == GGML_TYPE_IQ4_NL) { ns[0] = 32; ns[1] = 96; ns[2] = N - 32; }
        else if (ty == GGML_TYPE_Q2_K || ty == GGML_TYPE_Q3_K || ty == GGML_TYPE_IQ4_XS) { ns[0] = 256; }
        else continue;
        const struct ggml_type_traits_cpu * tr = ggml_get_type_traits_cpu(ty);
        for (int k = 0; k < 3 && ns[k]; k++) {
            for (int w = 0; w < ROWS; w++) {
                int a = (w + 1) % ROWS;
                types[t].ref(x[w], buf[0], N);
                ggml_get_type_traits_cpu(tr->vec_dot_type)->from_float(x[a], act[0], N);
                float s = 0;
                tr->vec_dot(ns[k], &s, 0, buf[0], 0, act[0], 0, 1);
                uint32_t bits; memcpy(&bits, &s, 4);
                printf("%s\n{\"type\": \"%s\", \"n\": %d, \"w_row\": %d, \"a_row\": %d, \"value_bits\": %u}",
                       first ? "" : ",", types[t].name, ns[k], w, a, bits);
                first = 0;
            }
        }
    }
    printf("]\n}\n");
    return 0;
}
