find_path(Ibverbs_INCLUDE_DIR infiniband/verbs.h)
find_library(Ibverbs_LIBRARY ibverbs)
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(Ibverbs REQUIRED_VARS Ibverbs_LIBRARY Ibverbs_INCLUDE_DIR)
if(Ibverbs_FOUND AND NOT TARGET Ibverbs::ibverbs)
  add_library(Ibverbs::ibverbs UNKNOWN IMPORTED)
  set_target_properties(Ibverbs::ibverbs PROPERTIES IMPORTED_LOCATION ${Ibverbs_LIBRARY}
    INTERFACE_INCLUDE_DIRECTORIES ${Ibverbs_INCLUDE_DIR})
endif()
