/* The C library's free(), for buffers the engine allocates and hands over. */
void free(void* ptr);
