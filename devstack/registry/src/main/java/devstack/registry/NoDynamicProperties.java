package devstack.registry;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;
import java.util.List;
import javax.enterprise.inject.Produces;
import javax.inject.Singleton;

/**
 * Stands in for the build step of apicurio-common-app-components-config-index, which Maven
 * Central lacks: that step lists the registry's properties that may change at run time. The
 * test registry has none, so every property keeps its start-up value.
 */
public class NoDynamicProperties {
    @Produces
    @Singleton
    DynamicConfigPropertyList none() {
        return new DynamicConfigPropertyList(List.of());
    }
}
