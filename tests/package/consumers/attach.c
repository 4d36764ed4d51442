/* A C program built against the packaged c_api.h and libweightd_client.so (pkg-config
 * weightd-client): attaches rank 0 of a model and prints its tensor count. */
#include <stdio.h>
#include <weightd/c_api.h>

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  wd_client* c = NULL;
  if (wd_connect(argv[1], &c) != WD_OK) {
    fprintf(stderr, "connect: %s\n", wd_last_error());
    return 1;
  }
  wd_attachment* a = NULL;
  if (wd_attach(c, argv[2], 0, &a) != WD_OK || wd_attachment_verify(a) != WD_OK) {
    fprintf(stderr, "attach: %s\n", wd_last_error());
    return 1;
  }
  printf("c: %zu tensors, generation %llu\n", wd_attachment_num_tensors(a),
         (unsigned long long)wd_attachment_generation(a));
  wd_attachment_release(a);
  wd_client_free(c);
  return 0;
}
