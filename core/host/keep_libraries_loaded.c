/* pmp-sanitize only (built with -fsanitize=address, which defines __SANITIZE_ADDRESS__): libraries
 * opened at run time stay loaded until exit. Open MPI and PMIx unload their plugins (mca_*.so,
 * pmix_mca_*.so) at MPI_Finalize, before LeakSanitizer looks at what the process still holds; the stacks of
 * the state those plugins keep for the life of the process would then point into unmapped memory, which
 * no suppression in tools/sanitize.supp can name (Open MPI 4.1 has no setting that keeps them loaded).
 * The executable exports its symbols (-rdynamic), so this definition is the one the libraries call. */
#ifdef __SANITIZE_ADDRESS__
int dlclose(void *handle);

int dlclose(void *handle) {
  (void)handle;
  return 0;
}
#else
/* ISO C wants at least one declaration in a translation unit. */
typedef int keep_libraries_loaded_unused;
#endif
